"""Run envelopes and cost lines: what each run was and consumed, materialized from its events (docs/envelopes.md)."""
