"""The Redis projection: per-run budget headroom and the decisions agents read instead of subscribing.

Keys (every one starts with a validated tenant id, and expires after ``ttl_s``):

- ``ctxflow:{tenant}:run:{run_id}``: JSON ``{"used": {<gauge>: n}, "hard": {<gauge>: n}, "manifest_version": v}``,
  a gauge being a slot, ``total``, ``run`` (consumption against the run cap) or ``subagent`` (a child run's
  share of its workflow) — read in one round trip by :func:`read_headroom`, or by :func:`read_admission` for
  the fast admission check. One string, not a hash: a hash of its fifteen fields plus ``EXPIRE`` cost 2.6x the
  client CPU.
- ``ctxflow:{tenant}:budget``: JSON ``{"hard": {<gauge>: n}, "users": {<user>: {<gauge>: n}},
  "manifest_version": v}``: the hard limits a run that has used nothing starts from, so the fast check can
  refuse a new run's oversized plan. Read together with the run's key (``MGET``) by :func:`read_admission`.
- ``ctxflow:{tenant}:decisions:{run_id}``: hash ``decision_id -> decision JSON``. A swap decision carries its
  summary's text: when a memory the summary used is deleted, :meth:`RedisProjection.withdraw_summaries` removes
  the decision (the memory was its only source) or drops the text (other sources fed it too). No other key
  holds memory content.

Writes set absolute values and key decisions by their deterministic id, so the projection is idempotent: a
batch replayed after a crash rewrites the same fields. The log stays the truth; this is rebuildable from it.

A write is one ``EVALSHA`` of :data:`_WRITE` (``SET ... EX`` per run, ``HSET`` + ``EXPIRE`` per decision), not a
pipeline of those commands: redis-py's asyncio client packs and parses every command in Python, and measured
16 us of the worker's CPU per run as a pipeline against 2.7 us as one script call. The script only names keys
it is given (``KEYS``), as Redis requires; it is loaded again by redis-py if the server lost it (restart).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from ctxflow.processors.admission import BudgetLimits, RunHeadroom
from ctxflow.processors.types import check_tenant
from ctxflow.schemas.models import Decision, Invalidation, InvalidationKind
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError

PREFIX = "ctxflow"


def run_key(tenant_id: str, run_id: str) -> str:
    """The key holding a run's budget headroom."""
    return f"{PREFIX}:{check_tenant(tenant_id)}:run:{_part(run_id)}"


def limits_key(tenant_id: str) -> str:
    """The key holding a tenant's budget limits for runs the projection has not seen."""
    return f"{PREFIX}:{check_tenant(tenant_id)}:budget"


def decisions_key(tenant_id: str, run_id: str) -> str:
    """The hash holding a run's decisions by id."""
    return f"{PREFIX}:{check_tenant(tenant_id)}:decisions:{_part(run_id)}"


def _part(value: str) -> str:
    if not value:
        raise ValueError("a Redis key part must be non-empty")
    return value


#: KEYS: string keys (runs, tenants' limits), then decision hashes. ARGV: ttl, number of string keys, a value
#: per string key, then a (decision id, decision JSON) pair per decision hash.
_WRITE = """
local ttl, runs = ARGV[1], tonumber(ARGV[2])
for i = 1, runs do
  redis.call('SET', KEYS[i], ARGV[2 + i], 'EX', ttl)
end
local at = 2 + runs
for i = runs + 1, #KEYS do
  redis.call('HSET', KEYS[i], ARGV[at + 1], ARGV[at + 2])
  redis.call('EXPIRE', KEYS[i], ttl)
  at = at + 2
end
return #KEYS
"""


class RedisProjection:
    """Writes budget headroom and decisions to Redis, one script call per write."""

    def __init__(self, url: str, ttl_s: int) -> None:
        # A restart or failover drops connections; writes are absolute and keyed by id, so repeating one is
        # safe. Connection errors, timeouts and a server still loading its data are retried for ~30 s (backoff
        # capped at 2 s); after that the batch fails and the worker stops (a restart replays it).
        retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=20)
        self._redis = aioredis.from_url(url, retry=retry, retry_on_error=[BusyLoadingError])
        self.ttl_s = ttl_s
        self._write = self._redis.register_script(_WRITE)

    async def write(self, headrooms: Sequence[tuple[str, str, RunHeadroom]], decisions: Sequence[Decision],
                    limits: Sequence[tuple[str, BudgetLimits]] = ()) -> int:
        """Project ``(tenant, run, headroom)`` triples, decisions and ``(tenant, limits)`` pairs; returns the
        number of keys written."""
        keys = [run_key(tenant_id, run_id) for tenant_id, run_id, _ in headrooms]
        keys += [limits_key(tenant_id) for tenant_id, _ in limits]
        args: list[str | int] = [self.ttl_s, len(keys)]
        args += [headroom.to_json() for _, _, headroom in headrooms]
        args += [budget.to_json() for _, budget in limits]
        for decision in decisions:
            keys.append(decisions_key(decision.tenant_id, decision.run_id or "-"))
            args += [decision.decision_id, decision.model_dump_json()]
        if keys:
            await self._write(keys=keys, args=args)
        return len(keys)

    async def withdraw_summaries(self, invalidations: Sequence[Invalidation]) -> int:
        """Apply summary invalidations (a source of the summary was deleted) to the decisions of their runs: a
        decision whose summary had the deleted record as its only source is removed (kind ``tombstone``); one
        whose summary other sources fed too keeps its provenance and loses its text (kind ``invalidation``: it
        must be summarised again). Idempotent; returns the decisions changed."""
        changed = 0
        for inv in invalidations:
            if inv.run_id is None:
                continue
            key = decisions_key(inv.tenant_id, inv.run_id)
            for decision_id, raw in (await self._redis.hgetall(key)).items():
                decision = Decision.model_validate_json(raw)
                summary = decision.summary
                if summary is None or summary.summary_id != inv.target_id:
                    continue
                if inv.kind is InvalidationKind.TOMBSTONE:
                    await self._redis.hdel(key, decision_id)
                elif summary.text is not None:
                    withdrawn = decision.model_copy(update={"summary": summary.model_copy(update={"text": None})})
                    await self._redis.hset(key, decision_id, withdrawn.model_dump_json())
                else:
                    continue
                changed += 1
        return changed

    async def close(self) -> None:
        """Release the connection pool."""
        await self._redis.aclose()


async def read_headroom(client: aioredis.Redis, tenant_id: str, run_id: str) -> RunHeadroom | None:
    """A run's projected headroom in one round trip, or None when the projection has not seen the run."""
    value = await client.get(run_key(tenant_id, run_id))
    return RunHeadroom.from_json(value) if value is not None else None


async def read_admission(client: aioredis.Redis, tenant_id: str, run_id: str
                         ) -> tuple[RunHeadroom | None, BudgetLimits | None]:
    """What the fast admission check needs, in one round trip: the run's headroom (None when the projection
    has not seen the run) and its tenant's limits for new runs (None before the worker projected any)."""
    run, limits = await client.mget(run_key(tenant_id, run_id), limits_key(tenant_id))
    return (RunHeadroom.from_json(run) if run is not None else None,
            BudgetLimits.from_json(limits) if limits is not None else None)


async def read_decisions(client: aioredis.Redis, tenant_id: str, run_id: str) -> list[Decision]:
    """A run's projected decisions, oldest first."""
    raw = await client.hgetall(decisions_key(tenant_id, run_id))
    decisions = [Decision.model_validate_json(v) for v in raw.values()]
    return sorted(decisions, key=lambda d: (d.decided_at, d.decision_id))
