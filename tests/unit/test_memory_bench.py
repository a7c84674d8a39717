"""The memory gate's speed script runs on its seeded mix and judges every kind of candidate it holds.

Not a timed test: the figure itself is reported by ``python -m ctxflow.streams.bench.memory_gate``.
"""

from __future__ import annotations

from ctxflow.streams.bench.memory_gate import measure, workload


def test_the_workload_is_seeded_and_mixed() -> None:
    assert workload(50) == workload(50)
    assert {c.scope for c in workload(200)} >= {"user", "tenant", "session"}


def test_measure_reports_rates_over_real_verdicts() -> None:
    result = measure(300)
    assert result["candidates"] == 300
    assert result["gate_candidates_per_cpu_second"] > 0 and result["processor_candidates_per_cpu_second"] > 0
    rules = result["rules"]
    assert sum(rules.values()) == 300
    # Secrets are refused and PII under the cited rule is kept: detection really ran.
    assert rules["secret_detected"] > 0 and rules["user_memory"] > 0 and rules["tenant_verified_fact"] > 0
