"""A ``ctxflow worker`` child process: how the demo, the benchmark and the tests run a real worker.

The worker runs in its own process because that is how it is deployed, because fault tests must SIGKILL it,
and because chDB hosts one engine per process (a worker holding the ClickHouse sink answers queries through its
HTTP endpoint).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

from ctxflow.sinks.clickhouse import QueryResult
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.inputs import FED_BACK, INPUT_MODELS
from ctxflow.streams.stack.processes import ManagedProcess, tail
from ctxflow.streams.stack.progress import GroupBehind, wait_group_committed, wait_sink_caught_up
from ctxflow.streams.stack.query import run_query

#: The worker's input topics (logical names), as its pipeline decodes them.
INPUT_TOPICS: tuple[str, ...] = tuple(INPUT_MODELS)
#: The input topics others write (agents, operators, summarizers): what counting a producer's records against
#: the worker's commits covers (the worker also reads back its own invalidations, :data:`FED_BACK`).
EXTERNAL_INPUTS: tuple[str, ...] = tuple(t for t in INPUT_TOPICS if t not in FED_BACK)


class WorkerNotReady(RuntimeError):
    """The worker did not own its partitions before the deadline (its log tail is in the message)."""


def settings_env(settings: Settings) -> dict[str, str]:
    """The process environment that makes a child process see ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTXFLOW_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"CTXFLOW_{name.upper()}"] = str(value)
    return env


def worker_health(web_port: int, timeout_s: float = 2.0) -> dict[str, Any]:
    """The ``/health`` answer of the worker on ``127.0.0.1:web_port``: status, owned partitions, per input
    partition progress, table records preloaded since start. Raises ``OSError`` (``URLError``) when none answers."""
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/health", timeout=timeout_s) as response:
        return cast(dict[str, Any], json.loads(response.read()))


class WorkerProcess:
    """One worker child process bound to ``settings`` (its web port must be free)."""

    def __init__(self, settings: Settings, log_path: Path | None = None, name: str = "worker") -> None:
        self.settings = settings
        self.log_path = log_path or settings.home / "logs" / f"{name}.log"
        argv = [sys.executable, "-m", "ctxflow.streams.cli", "worker", "--loglevel", "warning"]
        self._process = ManagedProcess(name, argv, self.log_path, env=settings_env(settings))

    @property
    def pid(self) -> int:
        return self._process.pid

    def start(self, ready_timeout_s: float = 60.0, *, sole: bool = True) -> WorkerProcess:
        """Spawn the worker and wait until it owns every input partition, or any when it is not the ``sole``
        worker of its app (stopping it if it never does)."""
        self._process.start()
        try:
            self.wait_ready(ready_timeout_s, sole=sole)
        except BaseException:
            self.stop()
            raise
        return self

    def health(self) -> dict[str, Any]:
        """The worker's ``/health`` answer (see :func:`worker_health`)."""
        return worker_health(self.settings.web_port)

    def partitions(self) -> list[int]:
        """The input partitions the worker processes now; none while it starts, rebalances or recovers."""
        try:
            return cast(list[int], self.health()["partitions"])
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return []

    def wait_ready(self, timeout_s: float, *, sole: bool = True) -> list[int]:
        """Poll ``/health`` until the worker processes every partition (``sole``) or any; returns them."""
        deadline = time.monotonic() + timeout_s
        want = list(range(self.settings.partitions))
        while time.monotonic() < deadline:
            if self._process.exit_code() is not None:
                raise WorkerNotReady(f"worker exited with {self._process.exit_code()}:\n{tail(self.log_path)}")
            partitions = self.partitions()
            if partitions == want or (partitions and not sole):
                return partitions
            time.sleep(0.1)
        raise WorkerNotReady(f"worker not ready after {timeout_s:.0f}s:\n{tail(self.log_path)}")

    def wait_caught_up(self, timeout_s: float = 60.0, *, sink: bool | None = None) -> dict[str, int]:
        """Wait until the worker's committed offsets reach the end of every input topic, then (``sink``; by
        default when this worker runs the ClickHouse sink) until the sink group committed every projected record.

        Offsets are committed only after a batch's effects are durable, so afterwards every record produced
        before this call is in Redis and on the decisions topic, and with the sink in ClickHouse. Returns the
        lag-free end offsets of the input topics.
        """
        ends = asyncio.run(_wait_caught_up(self.settings, timeout_s))
        if sink is None:
            try:
                sink = self.health().get("sink", {}).get("state") in ("starting", "writing", "retrying")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                sink = False  # no worker answers: no sink of its own to wait for
        if sink:
            try:
                wait_sink_caught_up(self.settings, timeout_s)
            except GroupBehind as error:
                raise WorkerNotReady(f"the worker's ClickHouse sink: {error}") from error
        return ends

    def query(self, sql: str) -> QueryResult:
        """Run an analyst query through this worker (never opening its chDB from this process)."""
        return run_query(self.settings, sql, direct_fallback=False)

    def scalar(self, sql: str) -> object:
        """The single value of a one-row, one-column query."""
        return self.query(sql).rows[0][0]

    def kill(self) -> None:
        """SIGKILL the worker (a crash)."""
        self._process.kill()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop gracefully (SIGTERM), killing after ``grace_s``: short enough that a caller stopping the worker and
        then its stack keeps a 10 s promise, and a kill loses nothing (uncommitted batches are replayed)."""
        self._process.stop(grace_s)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _wait_caught_up(settings: Settings, timeout_s: float) -> dict[str, int]:
    """Until the worker committed the ends of its inputs, and again while that grew them: it reads back what it
    writes (its invalidations, :data:`streams.runtime.inputs.FED_BACK`), so catching up ends at a fixed point."""
    from aiokafka import TopicPartition

    tps = [TopicPartition(settings.topic(t), p) for t in INPUT_TOPICS for p in range(settings.partitions)]
    deadline, ends = time.monotonic() + timeout_s, None
    while True:
        try:
            reached = await wait_group_committed(settings, settings.app_id, tps, max(deadline - time.monotonic(), 1))
        except GroupBehind as error:
            raise WorkerNotReady(f"worker {error}") from error
        if reached == ends:
            return {f"{tp.topic}:{tp.partition}": end for tp, end in reached.items()}
        ends = reached
