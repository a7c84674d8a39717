"""The read side for agents that read budget state instead of subscribing to decisions.

``BudgetReader`` answers from the Redis projection the worker maintains: a run's headroom, the fast
admission check (one round trip), and the decisions published about a run. Answers can lag the stream by one
worker batch; the decisions topic is authoritative (``CtxflowClient.request_admission`` asks for an
authoritative ``admission`` decision).
"""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis
from ctxflow.processors.admission import AdmissionAnswer, RunHeadroom, check_admission
from ctxflow.schemas.models import Decision, Slot
from ctxflow.sinks.redis import read_admission, read_decisions, read_headroom


class BudgetReader:
    """Tenant-scoped reads of the Redis projection. ``async with BudgetReader(url) as reader: ...``"""

    def __init__(self, redis_url: str) -> None:
        self._redis = aioredis.from_url(redis_url)

    async def headroom(self, tenant_id: str, run_id: str) -> RunHeadroom | None:
        """Tokens used and hard limits per slot of a run, or None before the worker has seen it."""
        return await read_headroom(self._redis, tenant_id, run_id)

    async def check_admission(self, tenant_id: str, run_id: str, planned: Mapping[Slot | str, int],
                              user_id: str | None = None) -> AdmissionAnswer:
        """Whether ``planned`` (slot -> tokens) fits the run's projected budget: one Redis round trip.

        A run the worker has not seen yet is checked against its tenant's limits for new runs, ``user_id``'s
        own where the tenant's manifest overrides them.
        """
        headroom, limits = await read_admission(self._redis, tenant_id, run_id)
        return check_admission(headroom, planned, limits, user_id)

    async def decisions(self, tenant_id: str, run_id: str) -> list[Decision]:
        """The decisions the worker published about a run, oldest first."""
        return await read_decisions(self._redis, tenant_id, run_id)

    async def close(self) -> None:
        """Release the connection pool."""
        await self._redis.aclose()

    async def __aenter__(self) -> BudgetReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
