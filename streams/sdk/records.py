"""Which topic a record goes to, under which key, and the privacy step it passes before it leaves."""

from __future__ import annotations

from typing import TypeVar

from ctxflow.schemas.models import (
    AdmissionRequest,
    Decision,
    MemoryCandidate,
    PrivacyMode,
    RunEvent,
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from ctxflow.schemas.models import content_digest as digest
from ctxflow.streams.topics import ADMISSIONS, DECISIONS, MANIFESTS, MEMORY_CANDIDATES, RUNS, TURNS, USAGE, TopicSpec
from pydantic import BaseModel

R = TypeVar("R", bound=BaseModel)

#: The contract topic of every record type the SDK publishes or reads.
TOPIC_OF: dict[type[BaseModel], TopicSpec] = {
    TurnEvent: TURNS, UsageReport: USAGE, RunEvent: RUNS, AdmissionRequest: ADMISSIONS,
    TenantManifest: MANIFESTS, MemoryCandidate: MEMORY_CANDIDATES, Decision: DECISIONS,
}


def record_key(spec: TopicSpec, record: BaseModel) -> bytes:
    """The partition key ``spec.key`` names (``tenant_id`` or ``tenant_id:run_id``); a null part is ``""``."""
    try:
        parts = [getattr(record, name) for name in spec.key.split(":")]
    except AttributeError as exc:
        raise ValueError(f"{type(record).__name__} has no field for key {spec.key!r} of {spec.name}") from exc
    return ":".join("" if part is None else str(part) for part in parts).encode()


def redact(record: R) -> R:
    """Privacy step: a ``no_retention`` record comes back without ``content`` and with its digest.

    Other records come back unchanged. ``token_count`` is never invented.
    """
    content = getattr(record, "content", None)
    if getattr(record, "privacy", None) != PrivacyMode.NO_RETENTION or content is None:
        return record
    kept = getattr(record, "content_digest", None) or digest(content)
    return record.model_copy(update={"content": None, "content_digest": kept})
