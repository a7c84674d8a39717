"""A private deployment on the session's stack for a whole test module: fresh topics, consumer group and home.

The ``settings`` fixture in ``tests/conftest.py`` is per test; modules that share one worker across tests (or
across hypothesis examples) build the same thing once with :func:`fresh_settings`. Modules whose records are told
apart by tenant id share the session's worker instead (``shared_deployment``, a :class:`SharedDeployment`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis
from ctxflow.processors.admission import RunHeadroom
from ctxflow.schemas.models import Decision
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk.budget_reader import BudgetReader
from ctxflow.streams.stack.admin import ensure_topics
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.worker_process import WorkerProcess

T = TypeVar("T")


@dataclass(frozen=True)
class SharedDeployment:
    """A running worker (hosting the ClickHouse sink) and the settings it runs on."""

    settings: Settings
    worker: WorkerProcess


def fresh_settings(stack: EmbeddedStack, home: Path) -> Settings:
    """The stack's addresses with a new topic prefix, app id and web port, and that prefix's topics created."""
    tag = uuid.uuid4().hex[:12]
    home.mkdir(parents=True, exist_ok=True)
    fresh = stack.settings.model_copy(
        update={"topic_prefix": f"t{tag}", "app_id": f"app-{tag}", "home": home, "web_port": free_port()}
    )
    ensure_topics(fresh)
    return fresh


def _read_projection(settings: Settings, read: Callable[[BudgetReader], Awaitable[T]]) -> T:
    async def run() -> T:
        reader = BudgetReader(settings.redis_url)
        try:
            return await read(reader)
        finally:
            await reader.close()

    return asyncio.run(run())


def redis_headroom(settings: Settings, tenant_id: str, run_id: str) -> RunHeadroom | None:
    """The run's projected headroom, read the way agents read it (the SDK's ``BudgetReader``)."""
    return _read_projection(settings, lambda reader: reader.headroom(tenant_id, run_id))


def redis_decisions(settings: Settings, tenant_id: str, run_id: str) -> list[Decision]:
    """The run's decisions as projected into Redis."""
    return _read_projection(settings, lambda reader: reader.decisions(tenant_id, run_id))


@contextlib.contextmanager
def redis_writes_paused(settings: Settings, timeout_s: float = 30.0) -> Iterator[None]:
    """Hold every Redis write (``CLIENT PAUSE ... WRITE``) for the block: a Redis stall, as an outage would
    cause, which keeps the worker's batch from finishing; reads still answer."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.client_pause(int(timeout_s * 1000), all=False)
        yield
    finally:
        client.client_unpause()
        client.close()


def drop_other_redis_clients(settings: Settings) -> None:
    """Close every other client connection (``CLIENT KILL TYPE normal SKIPME yes``), discarding commands a
    paused Redis had read from them but not run: a crashed process's last writes must not land later."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.client_kill_filter(_type="normal", skipme=True)
    finally:
        client.close()
