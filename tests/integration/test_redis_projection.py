"""The Redis projection against a real redis-server, read back the way agents read it (``BudgetReader``).

The worker writes it with one script call per slice of runs; these tests pin what that call must do: absolute
values an agent reads back, decisions kept by id, every key expiring within the configured TTL, and writes
that keep working after the server lost its scripts (a restart).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import redis.asyncio as aioredis
from ctxflow.processors.admission import RunHeadroom
from ctxflow.schemas.models import Decision, DecisionKind
from ctxflow.sinks.redis import RedisProjection, decisions_key, run_key
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk.budget_reader import BudgetReader
from ctxflow.streams.stack.embedded import EmbeddedStack

TTL_S = 600


def _headroom(history: int, version: int) -> RunHeadroom:
    return RunHeadroom({"history": history, "total": history + 50}, {"history": 8_000, "total": 32_000}, version)


def _admission(tenant_id: str, run_id: str, n: int) -> Decision:
    return Decision(
        decision_id=f"{run_id}-admission-{n}", tenant_id=tenant_id, run_id=run_id, kind=DecisionKind.ADMISSION,
        admitted=True, request_id=f"req-{n}", reason="admitted", decided_at=datetime(2026, 1, 1, 12, n, tzinfo=UTC),
    )


async def _ttls(url: str, keys: list[str]) -> list[int]:
    client = aioredis.from_url(url)
    try:
        return [await client.ttl(key) for key in keys]
    finally:
        await client.aclose()


def test_agents_read_back_what_was_projected_and_every_key_expires(settings: Settings) -> None:
    tenant, other = f"t-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        projection = RedisProjection(settings.redis_url, TTL_S)
        try:
            written = await projection.write(
                [(tenant, "run-a", _headroom(100, 1)), (tenant, "run-b", _headroom(7, 1)),
                 (other, "run-a", _headroom(5, 3))],
                [_admission(tenant, "run-a", 1)],
            )
            assert written == 4
            # A later batch: absolute values replace the earlier ones; decisions add up by id, and a replayed
            # decision (same id) changes nothing.
            await projection.write(
                [(tenant, "run-a", _headroom(250, 2))], [_admission(tenant, "run-a", 1), _admission(tenant, "run-a", 2)]
            )
            assert await projection.write([], []) == 0
        finally:
            await projection.close()
        async with BudgetReader(settings.redis_url) as reader:
            assert await reader.headroom(tenant, "run-a") == _headroom(250, 2)
            assert await reader.headroom(tenant, "run-b") == _headroom(7, 1)
            assert await reader.headroom(other, "run-a") == _headroom(5, 3)  # same run id, other tenant: its own
            assert await reader.headroom(tenant, "run-c") is None
            assert [d.decision_id for d in await reader.decisions(tenant, "run-a")] == [
                "run-a-admission-1", "run-a-admission-2"]
            assert await reader.decisions(other, "run-a") == []
        keys = [run_key(tenant, "run-a"), run_key(tenant, "run-b"), run_key(other, "run-a"),
                decisions_key(tenant, "run-a")]
        assert all(0 < ttl <= TTL_S for ttl in await _ttls(settings.redis_url, keys))

    asyncio.run(run())


def test_writes_go_on_after_redis_restarts_without_its_scripts(private_stack: EmbeddedStack) -> None:
    url, tenant = private_stack.settings.redis_url, f"t-{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        projection = RedisProjection(url, TTL_S)
        try:
            await projection.write([(tenant, "run-a", _headroom(1, 1))], [])
            private_stack.restart("redis")  # an empty server: no data, no loaded scripts, connections dropped
            await projection.write([(tenant, "run-a", _headroom(2, 1))], [_admission(tenant, "run-a", 2)])
        finally:
            await projection.close()
        async with BudgetReader(url) as reader:
            assert await reader.headroom(tenant, "run-a") == _headroom(2, 1)
            assert [d.decision_id for d in await reader.decisions(tenant, "run-a")] == ["run-a-admission-2"]

    asyncio.run(run())
