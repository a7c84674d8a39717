"""A run's integrity hash: a SHA-256 chain over its accepted events, recomputable from the events alone.

Canonical form of an event: the UTF-8 JSON array (no spaces, ``ensure_ascii=False``) of the fields below, in
this order; timestamps as epoch milliseconds, absent values as ``null``. Only facts every projection keeps are in
it (the ClickHouse ``turns``/``usage``/``runs`` rows hold them all), so the hash can be checked from there:
content enters through its digest, never itself (a no-retention turn's content is stored nowhere).

=========  ==========================================================================================
event      fields
=========  ==========================================================================================
turn       "turn", event_id, seq, user_id, agent_id, parent_run_id, role, kind, slot, item_id,
           content_digest, token_count, model, privacy, occurred_at, tool_call_id, layer
usage      "usage", event_id, call_id, user_id, agent_id, provider, model, input_tokens, output_tokens,
           cached_read_tokens, cache_write_tokens, reasoning_tokens, latency_ms, streamed, complete,
           occurred_at
run        "run", event_id, user_id, session_id, agent_id, parent_run_id, workflow_id, phase, status,
           policy_version, prefix_hash, model, privacy, occurred_at
=========  ==========================================================================================

Tenant and run are not repeated per event: they bind the whole hash (below), so an event moved to another run is
missing from this one.

Chains. Each input stream has its own chain ``c' = SHA-256(c || canonical(event))`` from 32 zero bytes,
over the events the run accepted (a duplicate the budget ignores never enters: same seq, call id or phase again):
turns in ``seq`` order, usage reports and run events in the order their stream carried them. Per stream, because
a tenant's records of one stream are read in offset order while the streams interleave differently on every
replay: a chain across streams would not be the same twice. Turns in ``seq`` order, because a producer may
publish a run's turns out of order (the worker holds the digest of a turn that arrives early until the turns
before it come, or until the reorder window declares them lost). The run's hash is
``SHA-256(canonical(["ctxflow.run-envelope.v1", tenant_id, run_id]) || turns chain || usage chain || runs chain)``,
hex.

What it detects: an accepted event missing, added, altered in any listed field, or (within a stream) moved. What
it assumes of a reader checking it from storage: usage reports and run events are read in the order they were
published, which for the SDK's runs is their ``occurred_at`` order (a run's calls end one after another, and
``started`` precedes ``finalized``); a producer that publishes them otherwise needs the log's order to check.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from hashlib import sha256
from json.encoder import c_make_encoder, encode_basestring

from ctxflow.processors.ledger import accept_seq
from ctxflow.processors.windows import to_ms
from ctxflow.schemas.models import RunEnvelope, RunEvent, RunPhase, TurnEvent, UsageReport, content_digest

EMPTY = bytes(32)
_DOMAIN = "ctxflow.run-envelope.v1"
# The JSON module's own C encoder, built once (json.dumps builds one per call: most of its cost on short arrays).
# Same output as json.dumps(value, ensure_ascii=False, separators=(",", ":")) for lists of str, int, bool, None.
_make = c_make_encoder or (lambda *args: json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).iterencode)
_ENCODE = _make(None, None, encode_basestring, None, ":", ",", False, False, True)


def _json(fields: list) -> bytes:
    return "".join(_ENCODE(fields, 0)).encode()


def turn_form(t: TurnEvent, ms: int) -> bytes:
    """A turn's canonical form (``ms``: its ``occurred_at`` in epoch milliseconds)."""
    digest = t.content_digest or content_digest(t.content or "")
    return _json([
        "turn", t.event_id, t.seq, t.user_id, t.agent_id, t.parent_run_id, t.role, t.kind, t.slot, t.item_id,
        digest, t.token_count, t.model, t.privacy, ms, t.tool_call_id, t.layer,
    ])


def usage_form(u: UsageReport, ms: int) -> bytes:
    """A usage report's canonical form."""
    return _json([
        "usage", u.event_id, u.call_id, u.user_id, u.agent_id, u.provider, u.model, u.input_tokens,
        u.output_tokens, u.cached_read_tokens, u.cache_write_tokens, u.reasoning_tokens, u.latency_ms, u.streamed,
        u.complete, ms,
    ])


def run_form(r: RunEvent, ms: int) -> bytes:
    """A run event's canonical form."""
    return _json([
        "run", r.event_id, r.user_id, r.session_id, r.agent_id, r.parent_run_id, r.workflow_id, r.phase, r.status,
        r.policy_version, r.prefix_hash, r.model, r.privacy, ms,
    ])


def step(chain: bytes, form: bytes) -> bytes:
    """The chain after one more event (``form``: its canonical form)."""
    return sha256(chain + form).digest()


def combine(tenant_id: str, run_id: str, turns: bytes, usage: bytes, runs: bytes) -> str:
    """The run's integrity hash (hex) from its identity and its three stream chains."""
    return sha256(_json([_DOMAIN, tenant_id, run_id]) + turns + usage + runs).hexdigest()


def integrity_hash(
    tenant_id: str, run_id: str, turns: Iterable[TurnEvent], usage: Iterable[UsageReport], runs: Iterable[RunEvent]
) -> str:
    """The hash of run ``run_id``'s events, each stream given in the order it carried them (for rows read from
    storage: usage and runs by ``occurred_at``); duplicates are dropped as the worker drops them (a turn whose seq
    came before, or one behind the reorder window; a call id or a phase again), and turns are chained in seq order.
    Events of other runs are not the run's: they are left out."""
    turns = [t for t in turns if (t.tenant_id, t.run_id) == (tenant_id, run_id)]
    usage = [u for u in usage if (u.tenant_id, u.run_id) == (tenant_id, run_id)]
    runs = [r for r in runs if (r.tenant_id, r.run_id) == (tenant_id, run_id)]
    upto, above, accepted = -1, 0, {}
    for t in turns:
        new, upto, above = accept_seq(upto, above, t.seq)
        if new:
            accepted[t.seq] = turn_form(t, to_ms(t.occurred_at))
    turn_chain = EMPTY
    for seq in sorted(accepted):
        turn_chain = step(turn_chain, accepted[seq])
    usage_chain, calls = EMPTY, set()
    for u in usage:
        if u.call_id not in calls:
            calls.add(u.call_id)
            usage_chain = step(usage_chain, usage_form(u, to_ms(u.occurred_at)))
    run_chain, phases = EMPTY, set()
    for r in runs:
        if r.phase not in phases:
            phases.add(r.phase)
            run_chain = step(run_chain, run_form(r, to_ms(r.occurred_at)))
    return combine(tenant_id, run_id, turn_chain, usage_chain, run_chain)


def verify(envelope: RunEnvelope, events: Iterable[TurnEvent | UsageReport | RunEvent]) -> bool:
    """Whether ``events`` (each stream in the order it carried them) hash to ``envelope``'s ``integrity_hash``:
    False when one of the run's events is missing, added or altered."""
    turns: list[TurnEvent] = []
    usage: list[UsageReport] = []
    runs: list[RunEvent] = []
    for e in events:
        if isinstance(e, TurnEvent):
            turns.append(e)
        elif isinstance(e, UsageReport):
            usage.append(e)
        else:
            runs.append(e)
    # A stream's order is its publication order; among run events that is started, then finalized.
    runs.sort(key=lambda r: r.phase is RunPhase.FINALIZED)
    return integrity_hash(envelope.tenant_id, envelope.run_id, turns, usage, runs) == envelope.integrity_hash
