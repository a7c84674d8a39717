"""The worker's input topics (logical names) and the record type each carries.

Apart from :mod:`streams.runtime.pipeline`, which decodes them, so that what only needs the names (the sink's
catalogue, the worker's process handle, the SDK and the CLI through them) does not import the processors, whose
content detectors take seconds to import.
"""

from __future__ import annotations

from ctxflow.schemas.models import (
    AdmissionRequest,
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
}
