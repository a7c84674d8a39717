"""Builders for budget-processor tests: valid records with overridable fields and a feed that numbers offsets.

Not a test module: it holds no tests; its name lets it live beside the tests that import it.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from ctxflow.processors.budget import BudgetProcessor, Event
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas.models import (
    AdmissionRequest,
    Decision,
    DecisionKind,
    RunEvent,
    SlotCaps,
    SpendWindow,
    TenantManifest,
    TurnEvent,
    UsageReport,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TOPIC = {TurnEvent: "turns", UsageReport: "usage", RunEvent: "runs", AdmissionRequest: "admissions"}
_COUNTER = TokenCounter()


def manifest(tenant: str = "acme", **fields: Any) -> TenantManifest:
    """A valid manifest: free tier, history cap 1000, total 10000, reject at the hard limit."""
    base: dict[str, Any] = {
        "tenant_id": tenant,
        "version": 1,
        "tier": "free",
        "slot_caps": SlotCaps(history=1000),
        "total_cap": 10_000,
        "hard_limit": "reject",
        "updated_at": NOW,
    }
    return TenantManifest(**(base | fields))


def window(kind: str, tokens: int | None = None, cost: int | None = None) -> SpendWindow:
    """A spend window of ``kind`` with a token and/or cost limit."""
    return SpendWindow(window=kind, max_tokens=tokens, max_cost_micros=cost)


def turn(seq: int, tokens: int, slot: str = "history", run: str = "r1", tenant: str = "acme", **f: Any) -> TurnEvent:
    """A turn of ``tokens`` tokens (supplied count) into ``slot``; the event id derives from run and seq."""
    base: dict[str, Any] = {
        "event_id": f"{tenant}-{run}-t{seq}",
        "tenant_id": tenant,
        "user_id": "u1",
        "session_id": "s1",
        "run_id": run,
        "agent_id": "planner",
        "seq": seq,
        "role": "user",
        "kind": "message",
        "slot": slot,
        "item_id": f"{run}-i{seq}",
        "content_digest": f"{seq:064x}",
        "token_count": tokens,
        "model": "gpt-4o",
        "occurred_at": NOW,
    }
    return TurnEvent(**(base | f))


def usage(call: str, inp: int, out: int = 0, run: str = "r1", tenant: str = "acme", **f: Any) -> UsageReport:
    """A provider usage report for ``call``."""
    base: dict[str, Any] = {
        "event_id": f"{tenant}-{run}-u-{call}",
        "tenant_id": tenant,
        "user_id": "u1",
        "session_id": "s1",
        "run_id": run,
        "agent_id": "planner",
        "call_id": call,
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": inp,
        "output_tokens": out,
        "latency_ms": 100,
        "occurred_at": NOW,
    }
    return UsageReport(**(base | f))


def run_event(
    phase: str,
    run: str = "r1",
    tenant: str = "acme",
    parent: str | None = None,
    workflow: str | None = None,
    **f: Any,
) -> RunEvent:
    """A run boundary; ``finalized`` gets status succeeded unless given."""
    base: dict[str, Any] = {
        "event_id": f"{tenant}-{run}-{phase}",
        "tenant_id": tenant,
        "user_id": "u1",
        "session_id": "s1",
        "run_id": run,
        "parent_run_id": parent,
        "workflow_id": workflow or run,
        "agent_id": "planner",
        "phase": phase,
        "status": "succeeded" if phase == "finalized" else None,
        "occurred_at": NOW,
    }
    return RunEvent(**(base | f))


def admission(planned: dict[str, int], run: str = "r1", tenant: str = "acme", **f: Any) -> AdmissionRequest:
    """An admission request for ``planned`` slot sizes."""
    base: dict[str, Any] = {
        "request_id": f"{tenant}-{run}-q{sorted(planned.items())}",
        "tenant_id": tenant,
        "user_id": "u1",
        "session_id": "s1",
        "run_id": run,
        "agent_id": "planner",
        "model": "gpt-4o",
        "planned": planned,
        "requested_at": NOW,
    }
    return AdmissionRequest(**(base | f))


class Feed:
    """Processes records in order, numbering offsets per topic (one partition each), like a consumer would."""

    def __init__(self, *manifests: TenantManifest) -> None:
        self.state = DictBudgetState()
        self.processor = BudgetProcessor(_COUNTER)
        self.offsets: dict[str, int] = defaultdict(int)
        for m in manifests:
            self.state.put_manifest(m.tenant_id, m)

    def __call__(self, event: Event, offset: int | None = None) -> list[Decision]:
        topic = TOPIC.get(type(event), "manifests")
        if offset is None:
            offset = self.offsets[topic]
            self.offsets[topic] += 1
        return self.processor.process(event, Position(topic, 0, offset), self.state, NOW)

    def all(self, *events: Event) -> list[Decision]:
        """Process ``events`` in order and return every decision."""
        return [d for e in events for d in self(e)]


def kinds(decisions: list[Decision]) -> list[tuple[DecisionKind, str | None, str | None]]:
    """``(kind, slot, state)`` of each decision, for compact assertions."""
    return [(d.kind, d.slot and d.slot.value, d.state and d.state.value) for d in decisions]
