"""A worker says how far behind each input partition is and whether it is stalled (``/health``, ``ctxflow
status``), logs a stall once, and logs no ERROR while it is healthy, quiet or busy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.stack.admin import ensure_topics
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.worker_process import INPUT_TOPICS, WorkerProcess, settings_env

from tests.support_kafka import wait_until
from tests.support_traffic import publish


def error_lines(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.log_path.read_text().splitlines() if "level=error" in line or "ERROR" in line]


def ctxflow_status(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctxflow.streams.cli", "status"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=60)


def test_a_quiet_then_busy_worker_reports_its_progress_and_logs_no_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Faust's stream monitors would have called every input partition stalled 2 s after start, and every
    # changelog partition unfetched, with an ERROR every 1.25 s (they did, at 5 minutes by default).
    monkeypatch.setenv("STREAM_PROCESSING_TIMEOUT", "2")
    # Quiet for longer than the stall threshold: records that then arrive must not count as waiting since the
    # last commit (before the quiet spell), or the worker would cry stall at the first record.
    settings = settings.model_copy(update={"stall_after_s": 5.0})
    with WorkerProcess(settings) as worker:
        quiet_until = time.monotonic() + settings.stall_after_s + 3  # past the threshold, by more than a check's period
        # A partition whose first fetch has not been answered yet has no known lag (state ok); within a few
        # fetches every partition of the empty topics is idle.
        health = wait_until(worker.health, lambda h: {p["state"] for p in h["progress"]} == {"idle"}, 10,
                            "idle partitions")
        expected = {(settings.topic(t), p) for t in INPUT_TOPICS for p in range(settings.partitions)}
        assert {(p["topic"], p["partition"]) for p in health["progress"]} == expected
        assert health["status"] == "ready" and all(p["lag"] == 0 for p in health["progress"])
        while time.monotonic() < quiet_until:
            time.sleep(0.5)

        events = list(Workload(3, tenants=4, sessions_per_tenant=2, max_events=4000).events())
        publish(settings, events)
        worker.wait_caught_up()
        progress = wait_until(lambda: worker.health()["progress"], lambda ps: all(p["lag"] == 0 for p in ps), 10,
                              "lag 0")
        turns = [p for p in progress if p["topic"] == settings.topic("turns")]
        assert all(p["last_commit_age_s"] < 30 for p in turns), turns  # every turns partition committed just now
        assert worker.health()["status"] == "ready"
        assert error_lines(worker) == []


def test_a_stalled_worker_is_degraded_once_in_health_status_and_log_and_recovers(
    private_stack: EmbeddedStack, tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    settings = private_stack.settings.model_copy(update={"home": home, "web_port": free_port(), "stall_after_s": 3.0})
    ensure_topics(settings)
    home.mkdir(parents=True, exist_ok=True)
    private_stack.state().save(home)  # as `ctxflow up` records it, so `ctxflow status` finds this stack
    broker = private_stack.pids["broker"]
    with WorkerProcess(settings) as worker:
        healthy = ctxflow_status(settings)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert f"worker on 127.0.0.1:{settings.web_port}: ready" in healthy.stdout

        os.kill(broker, signal.SIGSTOP)  # no fetch is answered, no commit can advance
        try:
            health = wait_until(worker.health, lambda h: h["status"] == "degraded", 20, "degraded status")
            assert {p["state"] for p in health["progress"]} == {"degraded"}
            assert all(p["last_fetch_age_s"] >= 3.0 for p in health["progress"]), health
            stalled = ctxflow_status(settings)
            assert stalled.returncode == 1, stalled.stdout + stalled.stderr
            assert f"worker on 127.0.0.1:{settings.web_port}: degraded" in stalled.stdout
            time.sleep(3)  # the stall goes on: it was logged once, and stays logged once
        finally:
            os.kill(broker, signal.SIGCONT)
        wait_until(worker.health, lambda h: h["status"] == "ready", 30, "ready status after the broker resumed")
        log = wait_until(worker.log_path.read_text, lambda text: "input partitions progress again" in text, 5,
                   "log line saying the partitions progress again")
        assert log.count("input partitions stalled") == 1, log
        assert log.count("input partitions progress again") == 1, log
        assert settings.topic("turns") in log and "changelog" not in log and "leader" not in log, log

    gone = ctxflow_status(settings)
    assert "no worker answers on" in gone.stdout and gone.returncode == 0, gone.stdout + gone.stderr
