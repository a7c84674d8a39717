"""What a decided batch projects into Redis, and in which order: run headroom, tenants' limits, decisions.

Agents that read instead of subscribing get a batch's values as soon as it is decided (step 3 of the commit
order in :mod:`streams.runtime.pipeline`), before earlier batches commit. That is harmless: values are absolute and
decision ids deterministic, so a replay writes the same again. Writes land one batch after another, in batch
order, so a later batch's values are the ones left.

A run retired by :mod:`processors.retention` is not projected again and its headroom key is not deleted: every
key expires ``CTXFLOW_REDIS_TTL_S`` after its last write, and an agent reading a retired run's stale headroom
reads what the run last held (a run is retired only after a window without events).
"""

from __future__ import annotations

import asyncio
import time

from ctxflow.processors.admission import BudgetLimits, RunHeadroom, run_headroom
from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.types import tenant_key
from ctxflow.schemas.models import Decision
from ctxflow.sinks.redis import RedisProjection
from ctxflow.streams.runtime.tables import TableBudgetStore

#: Runs (and decisions) projected to Redis per round trip.
_SLICE = 256
#: Seconds after which a tenant's limits for new runs are projected again, unchanged (at most).
_LIMITS_REFRESH_S = 60.0


class BudgetProjection:
    """Captures a batch's Redis values from the token tables and writes them in batch order."""

    def __init__(self, redis: RedisProjection, processor: BudgetProcessor, store: TableBudgetStore) -> None:
        self._redis, self._processor, self._store = redis, processor, store
        self._latest: asyncio.Task[None] | None = None  # the latest batch's write
        # Tenant -> (the manifest its limits were projected from, when): projected again when the manifest
        # changes, and well before the Redis key expires.
        self._limits_projected: dict[str, tuple[object, float]] = {}

    def start(self, runs: dict[str, str], tenants: set[str], decisions: list[Decision]) -> asyncio.Task[None]:
        """Capture the values of a decided batch now and start writing them after the previous batch's.

        ``runs`` maps the run key of every record the batch applied or skipped as already applied to the
        record's user; ``tenants`` are the tenants of every record it decoded. Call it before the changelog
        capture, which forgets which runs the batch wrote. Awaiting the returned task covers every earlier
        batch's write too (a failed predecessor fails it).
        """
        headrooms, limits = self._headrooms(runs), self._limits(tenants)
        self._latest = asyncio.create_task(self._write(headrooms, decisions, limits, after=self._latest))
        return self._latest

    async def _write(
        self, headrooms: list[tuple[str, str, RunHeadroom]], decisions: list[Decision],
        limits: list[tuple[str, BudgetLimits]], after: asyncio.Task[None] | None,
    ) -> None:
        if after is not None:
            await after
        # In slices: packing one call for thousands of runs would hold the event loop for milliseconds, and the
        # decisions of the batches being decided meanwhile would wait behind it.
        for start in range(0, max(len(headrooms), len(decisions), len(limits)), _SLICE):
            end = start + _SLICE
            await self._redis.write(headrooms[start:end], decisions[start:end], limits[start:end])

    def _headrooms(self, touched: dict[str, str]) -> list[tuple[str, str, RunHeadroom]]:
        # Runs written by this batch, and runs whose records it skipped as already applied: after a crash
        # between the changelogs and Redis, the replayed batch changes no table but must still project.
        ledgers = dict(self._store.dirty_runs())
        for key in touched.keys() - ledgers.keys():
            ledger = self._store.get_run(key)
            if ledger is not None:
                ledgers[key] = ledger
        out = []
        for key, ledger in ledgers.items():
            tenant_id, run_id = key.split(":", 1)
            budget = self._processor.budget(self._store, tenant_id, touched.get(key))
            out.append((tenant_id, run_id, run_headroom(ledger, budget)))
        return out

    def _limits(self, tenants: set[str]) -> list[tuple[str, BudgetLimits]]:
        """Limits for new runs of the batch's tenants whose manifest changed since they were last projected,
        or that were last projected a minute ago (so a Redis that lost its data has them back within one)."""
        out, now = [], time.monotonic()
        refresh_s = min(self._redis.ttl_s / 4, _LIMITS_REFRESH_S)
        for tenant_id in tenants:
            manifest = self._store.get_manifest(tenant_key(tenant_id))
            sent = self._limits_projected.get(tenant_id)
            if sent is not None and sent[0] is manifest and now - sent[1] < refresh_s:
                continue
            self._limits_projected[tenant_id] = (manifest, now)
            out.append((tenant_id, self._processor.limits(self._store, tenant_id)))
        return out
