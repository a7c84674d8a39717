"""Factories for the memory governance tests: candidates with sensible defaults, one shared gate."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import Any

from ctxflow.processors.memory.gate import MemoryGate
from ctxflow.schemas import content_digest
from ctxflow.schemas.models import MemoryCandidate, MemoryScope, MemoryType

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@cache
def shared_gate() -> MemoryGate:
    """One gate (detectors built once) for every test in the process, as the worker does."""
    return MemoryGate()


def candidate(content: str = "Prefers answers in French", **overrides: Any) -> MemoryCandidate:
    """A user-scope preference candidate of tenant ``acme`` unless ``overrides`` say otherwise."""
    fields: dict[str, Any] = {
        "event_id": f"e-{content_digest(content)[:8]}",
        "tenant_id": "acme",
        "user_id": "u-1",
        "session_id": "s-1",
        "run_id": "r-1",
        "agent_id": "assistant",
        "candidate_id": f"c-{content_digest(content)[:12]}",
        "scope": MemoryScope.USER,
        "type": MemoryType.PREFERENCE,
        "content": content,
        "content_digest": content_digest(content),
        "confidence": 0.9,
        "occurred_at": NOW,
    }
    fields.update(overrides)
    if "content" in overrides and "content_digest" not in overrides and overrides["content"] is not None:
        fields["content_digest"] = content_digest(overrides["content"])
    return MemoryCandidate(**fields)
