"""The worker's input topics (logical names) and the record type each carries.

Apart from :mod:`streams.runtime.pipeline`, which decodes them, so that what only needs the names (the sink's
catalogue, the worker's process handle, the SDK and the CLI through them) does not import the processors, whose
content detectors take seconds to import.
"""

from __future__ import annotations

from ctxflow.schemas.models import (
    AdmissionRequest,
    Invalidation,
    MemoryCandidate,
    MemoryCommand,
    RunEvent,
    Summary,
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from pydantic import BaseModel

#: Input topic (logical name) -> the model its records decode to.
INPUT_MODELS: dict[str, type[BaseModel]] = {
    "turns": TurnEvent,
    "usage": UsageReport,
    "runs": RunEvent,
    "admissions": AdmissionRequest,
    "manifests": TenantManifest,
    "summaries": Summary,
    "memory.candidates": MemoryCandidate,
    "memory.commands": MemoryCommand,
    "invalidations": Invalidation,
}

#: Input topics the worker writes itself: its memory processor's invalidations, read back so that the eviction
#: planner (earlier in the chain) applies them to its working sets. Every other processor ignores them. The
#: ClickHouse sink projects them as written, not as the workers decided (:mod:`streams.sink.catalogue`).
FED_BACK: frozenset[str] = frozenset({"invalidations"})
