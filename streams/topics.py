"""The topic catalogue: every topic ctxflow reads or writes, with its key, size and cleanup policy.

This table is the single source for topic creation (``ctxflow up``), the Faust app's topic objects and
the documentation in ``schemas/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ctxflow.streams.config import Settings

Cleanup = Literal["delete", "compact"]


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic of the contract."""

    name: str
    schema: str
    key: str
    cleanup: Cleanup
    producers: str
    consumers: str
    #: Fixed partition count; ``None`` means the deployment's ``Settings.partitions``.
    partitions: int | None = None

    def full_name(self, settings: Settings) -> str:
        return settings.topic(self.name)

    def partition_count(self, settings: Settings) -> int:
        return self.partitions or settings.partitions


TURNS = TopicSpec("turns", "TurnEvent", "tenant_id", "delete", "agent runtimes (SDK)", "worker: ingest, budget")
USAGE = TopicSpec("usage", "UsageReport", "tenant_id", "delete", "agent runtimes (SDK)", "worker: ingest, budget")
RUNS = TopicSpec("runs", "RunEvent", "tenant_id", "delete", "agent runtimes (SDK)", "worker: ingest, budget")
ADMISSIONS = TopicSpec(
    "admissions", "AdmissionRequest", "tenant_id", "delete", "agent runtimes (SDK)", "worker: budget"
)
MANIFESTS = TopicSpec(
    "manifests", "TenantManifest", "tenant_id", "compact", "operators (`ctxflow tenants set`, SDK)",
    "worker: budget (every replica reads all partitions)",
)
MEMORY_CANDIDATES = TopicSpec(
    "memory.candidates", "MemoryCandidate", "tenant_id", "delete", "agent runtimes (SDK)",
    "worker: envelopes (promotions by scope), memory gate",
)
MEMORY_RECORDS = TopicSpec(
    "memory.records", "MemoryRecord", "tenant_id:memory_id", "compact", "worker: memory gate",
    "retrieval indexes, ClickHouse sink",
)
MEMORY_COMMANDS = TopicSpec(
    "memory.commands", "MemoryCommand", "tenant_id", "delete",
    "operators (`ctxflow memory review|delete|rehydrate|pin|unpin`)", "worker: memory gate",
)
MEMORY_VERDICTS = TopicSpec(
    "memory.verdicts", "MemoryVerdict", "tenant_id", "delete", "worker: memory gate",
    "ClickHouse sink (`memory_verdicts`), operators",
)
DECISIONS = TopicSpec(
    "decisions", "Decision", "tenant_id:run_id", "delete", "worker: budget, eviction, memory gate",
    "agent runtimes (SDK subscribe), Redis and ClickHouse sinks",
)
INVALIDATIONS = TopicSpec(
    "invalidations", "Invalidation", "tenant_id", "delete", "worker: memory gate",
    "every projection (Redis, ClickHouse, indexes), agent runtimes, worker: eviction planner (summaries)",
)
COMPRESSION_JOBS = TopicSpec(
    "compression.jobs", "CompressionJob", "tenant_id", "delete", "worker: eviction planner",
    "summarizer workers (`ctxflow summarizer`, their own consumer group)",
)
SUMMARIES = TopicSpec(
    "summaries", "Summary", "tenant_id", "delete", "summarizer workers", "worker: eviction planner (swap)",
)
ENVELOPES = TopicSpec(
    "envelopes", "RunEnvelope", "tenant_id:run_id", "compact", "worker: envelope processor",
    "ClickHouse sink, `ctxflow report`",
)
COSTS = TopicSpec(
    "costs", "CostLine", "tenant_id", "delete", "worker: envelope processor", "ClickHouse sink, `ctxflow report`",
)
DEAD_LETTERS = TopicSpec(
    "deadletters", "DeadLetter", "source topic", "delete", "worker: any agent that rejects a record",
    "operators, ClickHouse sink",
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    TURNS, USAGE, RUNS, ADMISSIONS, MANIFESTS, MEMORY_CANDIDATES, MEMORY_COMMANDS, MEMORY_RECORDS, MEMORY_VERDICTS,
    DECISIONS, INVALIDATIONS, COMPRESSION_JOBS, SUMMARIES, ENVELOPES, COSTS, DEAD_LETTERS,
)
