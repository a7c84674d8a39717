"""SIGTERM or SIGINT stops ``ctxflow worker``, ``ctxflow up --foreground`` and ``ctxflow demo`` within 10 s even
while the broker hangs (SIGSTOPped: every request to it waits forever), and leaves no process behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.stack.admin import ensure_topics
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.processes import free_port, pid_alive, tail
from ctxflow.streams.stack.worker_process import WorkerProcess, settings_env

from tests.support_kafka import committed_records, wait_until
from tests.support_traffic import publish

STOP_PROMISE_S = 10.0


def stop_time(process: subprocess.Popen[bytes], sig: signal.Signals) -> float:
    """Seconds from ``sig`` to the process's exit (failing at twice the promise, after killing it)."""
    began = time.monotonic()
    process.send_signal(sig)
    try:
        process.wait(2 * STOP_PROMISE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"pid {process.pid} still ran {2 * STOP_PROMISE_S:.0f}s after {sig.name}")
    return time.monotonic() - began


@contextlib.contextmanager
def spawned(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``ctxflow ARGS`` as a child with its output piped; killed (with its attached children) if still running."""
    with subprocess.Popen([sys.executable, "-m", "ctxflow.streams.cli", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


@pytest.fixture
def stalled_broker(private_stack: EmbeddedStack) -> Iterator[Callable[[], None]]:
    """Call to freeze the private stack's broker; it is thawed (for the stack's own stop) after the test."""
    broker = private_stack.pids["broker"]
    yield lambda: os.kill(broker, signal.SIGSTOP)
    if pid_alive(broker):
        os.kill(broker, signal.SIGCONT)


def private_settings(stack: EmbeddedStack, home: Path) -> Settings:
    settings = stack.settings.model_copy(update={"home": home, "web_port": free_port()})
    ensure_topics(settings)
    return settings


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_busy_worker_stops_within_10s_when_the_broker_hangs(
    private_stack: EmbeddedStack, stalled_broker: Callable[[], None], tmp_path: Path, sig: signal.Signals,
) -> None:
    settings = private_settings(private_stack, tmp_path / "home")
    with WorkerProcess(settings) as worker:
        publish(settings, Workload(5, tenants=4, sessions_per_tenant=2, max_events=30_000).events())
        stalled_broker()  # mid-stream: decisions, changelogs and commits in flight hang from here on
        time.sleep(1.0)  # let the worker get stuck in them (a stop before that is the easy case)
        took = stop_time(worker._process._popen, sig)  # type: ignore[arg-type]
    assert took < STOP_PROMISE_S, f"stopped after {took:.1f}s:\n{tail(worker.log_path)}"


def test_up_foreground_stops_within_10s_when_its_broker_hangs(tmp_path: Path) -> None:
    home = tmp_path / "up"
    env = settings_env(Settings(home=home, bootstrap=f"127.0.0.1:{free_port()}",
                                redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    with spawned(["up", "--foreground"], env) as up:
        assert up.stdout is not None
        banner = up.stdout.readline().decode()  # "stack up: broker pid N ready in ..., redis pid M ..."
        pids = {name: int(pid) for name, pid in re.findall(r"(\w+) pid (\d+)", banner)}
        assert set(pids) == {"broker", "redis"}, banner
        os.kill(pids["broker"], signal.SIGSTOP)
        took = stop_time(up, signal.SIGTERM)
    assert took < STOP_PROMISE_S, f"ctxflow up --foreground stopped after {took:.1f}s"
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []


def test_demo_stops_within_10s_when_its_broker_hangs(tmp_path: Path) -> None:
    env = settings_env(Settings(home=tmp_path / "home"))
    lines: list[str] = []
    with spawned(["demo", "--duration", "60", "--rate", "500"], env) as demo:
        assert demo.stdout is not None
        # "processes: ..." is printed once its worker is ready, "summarizer pid N" once its summarizer started.
        while not any(line.startswith("summarizer pid") for line in lines):
            line = demo.stdout.readline().decode()
            assert line, f"the demo exited before its worker and summarizer were up:\n{''.join(lines)}"
            lines.append(line)
        started = "".join(line for line in lines if line.startswith(("processes:", "summarizer pid")))
        pids = {name: int(pid) for name, pid in re.findall(r"(\w+) pid (\d+)", started)}
        assert set(pids) == {"broker", "redis", "worker", "summarizer"}, started
        # Traffic flows: the demo's worker (its default app id and topics) has committed records it was sent.
        bootstrap = re.search(r"\(broker (\S+),", "".join(lines))
        assert bootstrap, "".join(lines)
        flowing = Settings(home=tmp_path / "home", bootstrap=bootstrap[1])
        wait_until(lambda: committed_records(flowing), lambda n: n > 0, timeout_s=30, what="the demo's traffic")
        os.kill(pids["broker"], signal.SIGSTOP)
        time.sleep(1.0)
        took = stop_time(demo, signal.SIGTERM)
        output = "".join(lines) + demo.stdout.read().decode()
    assert took < STOP_PROMISE_S, f"ctxflow demo stopped after {took:.1f}s:\n{output}"
    assert [name for name, pid in pids.items() if pid_alive(pid)] == [], output
    assert demo.returncode == 130, output
