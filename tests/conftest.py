"""Shared fixtures: one embedded stack per test session, fresh topics and ids per test.

``stack``    the session's ``EmbeddedStack`` (real Tansu broker + redis-server on free loopback ports, chDB
             directory) in a temporary directory; nothing of it survives the session.
``private_stack`` per test: a stack of its own, for tests that kill or restart servers.
``settings`` per test: the stack's addresses with a fresh ``topic_prefix``, ``app_id`` (consumer group) and
             ``home`` (so chDB data and Faust state are private), and that prefix's topics already created.
``shared_deployment`` the session's one worker (hosting the ClickHouse sink) on topics of its own, for modules whose
             tests tell their records apart by tenant id: starting a worker costs several seconds.

Tests under ``tests/integration`` and ``tests/faults`` are marked ``integration`` (and ``faults``) by path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_deploy import SharedDeployment, fresh_settings

TESTS_DIR = Path(__file__).parent
_MARKERS = {
    "integration": "needs the embedded stack (broker, redis, chDB)",
    "faults": "crash and outage tests against the embedded stack",
}
#: Machine facts, not behaviour: tests may keep these from the environment.
_KEPT_ENV = {"CTXFLOW_REDIS_SERVER_BIN"}


def pytest_configure(config: pytest.Config) -> None:
    # A developer's exported CTXFLOW_* (say, a real ClickHouse DSN) must not leak into tests.
    for name in [n for n in os.environ if n.startswith("CTXFLOW_") and n not in _KEPT_ENV]:
        del os.environ[name]
    registered = "\n".join(config.getini("markers"))
    for name, text in _MARKERS.items():
        if f"{name}:" not in registered:
            config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            area = item.path.relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue
        if area in ("integration", "faults"):
            item.add_marker(pytest.mark.integration)
        if area == "faults":
            item.add_marker(pytest.mark.faults)


def loopback_settings(home: Path, **overrides: Any) -> Settings:
    """Settings for a stack under ``home`` on two distinct free loopback ports."""
    kafka_port = free_port()
    redis_port = free_port()
    while redis_port == kafka_port:
        redis_port = free_port()
    # Four partitions, not the default one: tests exercise tenants spread over partitions, rebalances and
    # per-partition ownership, which one partition would never show.
    # No wall-clock retention sweeps (tests stamp their records in the past, and a sweep would expire them
    # whenever a deployment happened to live long enough): the test of that sweep turns it on.
    fields: dict[str, Any] = {"partitions": 4, "expiry_sweep_s": 0, **overrides}
    return Settings(home=home, bootstrap=f"127.0.0.1:{kafka_port}", redis_url=f"redis://127.0.0.1:{redis_port}/0",
                    **fields)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """The session's running stack; stopped (no process left) when the session ends."""
    with EmbeddedStack(loopback_settings(tmp_path_factory.mktemp("stack"))) as running:
        yield running


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    """A stack only this test uses (it may ``kill``/``restart`` its servers); no topics created."""
    with EmbeddedStack(loopback_settings(tmp_path / "private-stack")) as running:
        yield running


@pytest.fixture
def settings(stack: EmbeddedStack, tmp_path: Path) -> Settings:
    """This test's settings: the stack's addresses, private topics, consumer group and home directory."""
    return fresh_settings(stack, tmp_path / "home")


@pytest.fixture
def worker(settings: Settings) -> Iterator[WorkerProcess]:
    """A real ``ctxflow worker`` process on this test's settings, ready (owning every partition)."""
    with WorkerProcess(settings) as running:
        yield running


@pytest.fixture(scope="session")
def shared_deployment(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedDeployment]:
    """One worker for every module that asks: its topics, ClickHouse tables, Redis keys, payloads and logs hold
    other modules' records too, so a user of it picks its own by tenant id (a tenant id no other module uses) and
    never stops or reconfigures the worker."""
    settings = fresh_settings(stack, tmp_path_factory.mktemp("shared-deployment") / "home")
    with WorkerProcess(settings) as worker:
        yield SharedDeployment(settings, worker)
