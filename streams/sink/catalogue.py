"""What the ClickHouse sink projects: topic -> the record type it carries (each type has one table).

Another projected topic is one line here, provided ``sinks.clickhouse_ddl`` has a table for its record type.
"""

from __future__ import annotations

from ctxflow.schemas.models import (
    CostLine,
    DeadLetter,
    Decision,
    Invalidation,
    MemoryRecord,
    MemoryVerdict,
    RunEnvelope,
    RunEvent,
    TurnEvent,
    UsageReport,
)
from ctxflow.sinks.clickhouse_ddl import TABLE_BY_MODEL
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.inputs import FED_BACK, INPUT_MODELS
from ctxflow.streams.topics import (
    COSTS,
    DEAD_LETTERS,
    DECISIONS,
    ENVELOPES,
    INVALIDATIONS,
    MEMORY_RECORDS,
    MEMORY_VERDICTS,
    RUNS,
    TURNS,
    USAGE,
    TopicSpec,
)
from pydantic import BaseModel

PROJECTED: dict[TopicSpec, type[BaseModel]] = {
    TURNS: TurnEvent,
    USAGE: UsageReport,
    RUNS: RunEvent,
    DECISIONS: Decision,
    DEAD_LETTERS: DeadLetter,
    MEMORY_RECORDS: MemoryRecord,
    MEMORY_VERDICTS: MemoryVerdict,
    INVALIDATIONS: Invalidation,
    ENVELOPES: RunEnvelope,
    COSTS: CostLine,
}
"""Every topic the sink reads, with the record type its values decode to."""

_UNPROJECTED = [model.__name__ for model in PROJECTED.values() if model not in TABLE_BY_MODEL]
if _UNPROJECTED:  # a topic whose records have no table would be read and dropped: refuse at import
    raise TypeError(f"no ClickHouse table projects {_UNPROJECTED}: add one to sinks.clickhouse_ddl.TABLES")


def sink_group(settings: Settings) -> str:
    """The sinks' consumer group (``settings.sink_group``, by default ``<app_id>-sink``): beside the deciding
    workers' ``app_id``, never in it."""
    return settings.sink_group or f"{settings.app_id}-sink"


def decided_by_workers(spec: TopicSpec) -> bool:
    """True for topics the deciding workers consume from outside: the sink writes their records as the workers
    decided (:mod:`.verdict`), not by a decode of its own. Not for what the workers write and read back
    (invalidations): those are projected as written, at once, whatever the workers' progress reading them."""
    return spec.name in INPUT_MODELS and spec.name not in FED_BACK


def keyed_by_tenant(spec: TopicSpec) -> bool:
    """True for topics whose record key must be the record's tenant id (the worker's key rule)."""
    return spec.key == "tenant_id"
