"""The Redis projection: per-run budget headroom and the decisions agents read instead of subscribing.

Keys (every one starts with a validated tenant id, and expires after ``ttl_s``):

- ``ctxflow:{tenant}:run:{run_id}``: JSON ``{"used": {<slot>|"total": n}, "hard": {<slot>|"total": n},
  "manifest_version": v}`` — read in one round trip (``GET``) by :func:`read_headroom` for the fast admission
  check. One string, not a hash: it is written with one ``SET ... EX`` per run and batch; a hash of its fifteen
  fields plus ``EXPIRE`` cost 2.6x the client CPU (measured 23 us against 9 us per run, JSON included:
  redis-py's asyncio client packs commands in Python).
- ``ctxflow:{tenant}:decisions:{run_id}``: hash ``decision_id -> decision JSON``.

Writes set absolute values and key decisions by their deterministic id, so the projection is idempotent: a
batch replayed after a crash rewrites the same fields. The log stays the truth; this is rebuildable from it.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis

from processors.admission import RunHeadroom
from processors.types import check_tenant
from schemas.models import Decision

PREFIX = "ctxflow"


def run_key(tenant_id: str, run_id: str) -> str:
    """The key holding a run's budget headroom."""
    return f"{PREFIX}:{check_tenant(tenant_id)}:run:{_part(run_id)}"


def decisions_key(tenant_id: str, run_id: str) -> str:
    """The hash holding a run's decisions by id."""
    return f"{PREFIX}:{check_tenant(tenant_id)}:decisions:{_part(run_id)}"


def _part(value: str) -> str:
    if not value:
        raise ValueError("a Redis key part must be non-empty")
    return value


class RedisProjection:
    """Writes budget headroom and decisions to Redis in one pipeline per batch."""

    def __init__(self, url: str, ttl_s: int) -> None:
        self._redis = aioredis.from_url(url)
        self._ttl_s = ttl_s

    async def write(self, headrooms: Iterable[tuple[str, str, RunHeadroom]], decisions: Iterable[Decision]) -> int:
        """Project ``(tenant, run, headroom)`` triples and decisions; returns the number of keys written."""
        pipe = self._redis.pipeline(transaction=False)
        written = 0
        for tenant_id, run_id, headroom in headrooms:
            key = run_key(tenant_id, run_id)
            pipe.set(key, headroom.to_json(), ex=self._ttl_s)
            written += 1
        for decision in decisions:
            key = decisions_key(decision.tenant_id, decision.run_id or "-")
            pipe.hset(key, decision.decision_id, decision.model_dump_json())
            pipe.expire(key, self._ttl_s)
            written += 1
        if written:
            await pipe.execute()
        return written

    async def close(self) -> None:
        """Release the connection pool."""
        await self._redis.aclose()


async def read_headroom(client: aioredis.Redis, tenant_id: str, run_id: str) -> RunHeadroom | None:
    """A run's projected headroom in one round trip, or None when the projection has not seen the run."""
    value = await client.get(run_key(tenant_id, run_id))
    return RunHeadroom.from_json(value) if value is not None else None


async def read_decisions(client: aioredis.Redis, tenant_id: str, run_id: str) -> list[Decision]:
    """A run's projected decisions, oldest first."""
    raw = await client.hgetall(decisions_key(tenant_id, run_id))
    decisions = [Decision.model_validate_json(v) for v in raw.values()]
    return sorted(decisions, key=lambda d: (d.decided_at, d.decision_id))
