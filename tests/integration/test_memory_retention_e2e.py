"""Retention for a tenant that went quiet, through the real worker: its own records no longer move its event-time
clock, so the worker sends an ``expire`` command on its wall clock, through the log, and the records whose
lifetime ended become tombstones while the others stay."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    MemoryCommand,
    MemoryCommandKind,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryStore,
    MemoryType,
    SlotCaps,
    TenantManifest,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_kafka import read_topics, wait_processed, wait_until
from tests.support_traffic import publish

TENANT = "quiet-tenant"


def _latest(settings: Settings) -> dict[str, MemoryRecord]:
    codec = Codec(settings.schema_registry_url)
    records = [codec.decode(r.value, MemoryRecord) for r in asyncio.run(read_topics(settings, ["memory.records"]))]
    return {r.memory_id: r for r in records}


def test_a_quiet_tenants_expired_memories_become_tombstones_and_the_rest_stay(settings: Settings) -> None:
    sweeping = settings.model_copy(update={"expiry_sweep_s": 0.5})
    now = datetime.now(UTC)
    run = RunContext(tenant_id=TENANT, user_id="ada", session_id="s-1", agent_id="assistant", model="gpt-4o",
                     run_id="run-1")
    manifest = TenantManifest(tenant_id=TENANT, version=1, tier="pro", slot_caps=SlotCaps(), total_cap=1_000_000,
                              updated_at=now - timedelta(days=4),
                              memory_store=MemoryStore(retention_days={"preference": 1}))
    # Learnt three days ago, kept for a day: its retention ended two days ago. The tenant sends nothing after.
    old = run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "Prefers answers in French",
                               confidence=0.9, at=now - timedelta(days=3))
    fresh = run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "Prefers dark mode", confidence=0.9,
                                 at=now)
    with WorkerProcess(sweeping):
        publish(sweeping, [manifest])
        wait_processed(sweeping)
        publish(sweeping, [old, fresh])
        latest = wait_until(lambda: _latest(sweeping),
                            lambda records: any(r.status is MemoryStatus.REVOKED for r in records.values()),
                            what="the expired memory's tombstone")
    (gone,) = [r for r in latest.values() if r.status is MemoryStatus.REVOKED]
    (kept,) = [r for r in latest.values() if r.status is not MemoryStatus.REVOKED]
    assert (gone.reason, gone.content, gone.content_digest) == ("expired", None, old.content_digest)
    assert kept.content == "Prefers dark mode" and kept.status in (MemoryStatus.PROVISIONAL, MemoryStatus.ACTIVE)
    # What did it is on the log, as an operator's command would be: a replay expires the same records.
    codec = Codec(sweeping.schema_registry_url)
    commands = [codec.decode(r.value, MemoryCommand)
                for r in asyncio.run(read_topics(sweeping, ["memory.commands"]))]
    assert commands and {(c.tenant_id, c.kind) for c in commands} == {(TENANT, MemoryCommandKind.EXPIRE)}
