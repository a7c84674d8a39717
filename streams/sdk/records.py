"""Which topic a record goes to, under which key, and the steps it passes before it leaves (privacy, then a
turn's content features)."""

from __future__ import annotations

import functools
from typing import TypeVar, cast

from ctxflow.processors.eviction.features import with_features
from ctxflow.processors.tokens import TokenCounter
from ctxflow.schemas.models import (
    AdmissionRequest,
    Decision,
    MemoryCandidate,
    MemoryCommand,
    PrivacyMode,
    RunEvent,
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from ctxflow.schemas.models import content_digest as digest
from ctxflow.streams.topics import (
    ADMISSIONS,
    DECISIONS,
    MANIFESTS,
    MEMORY_CANDIDATES,
    MEMORY_COMMANDS,
    RUNS,
    TURNS,
    USAGE,
    TopicSpec,
)
from pydantic import BaseModel

R = TypeVar("R", bound=BaseModel)

#: The contract topic of every record type the SDK publishes or reads.
TOPIC_OF: dict[type[BaseModel], TopicSpec] = {
    TurnEvent: TURNS, UsageReport: USAGE, RunEvent: RUNS, AdmissionRequest: ADMISSIONS,
    TenantManifest: MANIFESTS, MemoryCandidate: MEMORY_CANDIDATES, MemoryCommand: MEMORY_COMMANDS,
    Decision: DECISIONS,
}


def record_key(spec: TopicSpec, record: BaseModel) -> bytes:
    """The partition key ``spec.key`` names (``tenant_id`` or ``tenant_id:run_id``); a null part is ``""``."""
    try:
        parts = [getattr(record, name) for name in spec.key.split(":")]
    except AttributeError as exc:
        raise ValueError(f"{type(record).__name__} has no field for key {spec.key!r} of {spec.name}") from exc
    return ":".join("" if part is None else str(part) for part in parts).encode()


@functools.cache
def token_counter() -> TokenCounter:
    """The SDK's token counter (the worker's registry and model table; encodings load on first use)."""
    return TokenCounter()


def outgoing(record: R) -> R:
    """``record`` as the SDK sends it: redacted (:func:`redact`), then a turn's content features attached
    (:func:`~processors.eviction.features.with_features`: the worker's planner need not read its text again)."""
    record = redact(record)
    return cast(R, with_features(record)) if isinstance(record, TurnEvent) else record


def redact(record: R) -> R:
    """Privacy step: a ``no_retention`` record comes back without ``content`` and with its digest (a memory
    candidate also without its ``subject``, ``attribute``, ``value`` and ``embedding``).

    A no-retention turn keeps its ``token_count``, counted here from the content before it goes when the caller
    gave none (with the model's encoding, as the worker would: privacy never switches budgets off). Other records
    come back unchanged.
    """
    if getattr(record, "privacy", None) != PrivacyMode.NO_RETENTION:
        return record
    update: dict[str, object] = {}
    if isinstance(record, MemoryCandidate):
        # What a candidate states beside its content is payload too: a value, its subject, an embedding of it.
        update |= {"subject": None, "attribute": None, "value": None, "embedding": None}
    content = getattr(record, "content", None)
    if content is None:
        return record.model_copy(update=update) if update else record
    kept = getattr(record, "content_digest", None) or digest(content)
    update |= {"content": None, "content_digest": kept}
    if isinstance(record, TurnEvent) and record.token_count is None:
        update["token_count"] = token_counter().count(content, record.model, digest=kept).tokens
    return record.model_copy(update=update)
