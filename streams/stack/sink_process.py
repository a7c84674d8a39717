"""A ``ctxflow sink`` child process, and the wait for a sink group to catch up with its topics.

Like :class:`~streams.stack.worker_process.WorkerProcess`: its own process because that is how it is deployed and
scaled, because fault tests SIGKILL it or take its backend away, and because chDB admits one process per directory.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from ctxflow.streams.config import Settings
from ctxflow.streams.stack.processes import ServiceProcess, tail
from ctxflow.streams.stack.progress import wait_sink_caught_up
from ctxflow.streams.stack.worker_process import settings_env


class SinkNotReady(RuntimeError):
    """The sink did not get partitions, or did not catch up, before the deadline (its log tail is in the message)."""


def sink_health(port: int, timeout_s: float = 2.0) -> dict[str, Any]:
    """The ``/health`` answer of the sink on ``127.0.0.1:port`` (:meth:`streams.sink.host.SinkHost.health`).
    Raises ``OSError`` (``URLError``) when none answers."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout_s) as response:
        return cast(dict[str, Any], json.loads(response.read()))


class SinkProcess(ServiceProcess):
    """One ``ctxflow sink`` child process bound to ``settings`` (its ``sink_web_port`` must be free); ready once its
    group gave it partitions. Stopped (SIGTERM), it flushes and commits once more.

    ``wrap`` prefixes the command, e.g. ``("setpriv", "--bounding-set", "-dac_override")`` to run it without root's
    power over file permissions.
    """

    def __init__(self, settings: Settings, log_path: Path | None = None, name: str = "sink", *,
                 wrap: Sequence[str] = ()) -> None:
        self.settings = settings
        argv = [*wrap, sys.executable, "-m", "ctxflow.streams.cli", "sink", "--loglevel", "info"]
        super().__init__(name, argv, log_path or settings.home / "logs" / f"{name}.log", settings_env(settings))

    def health(self) -> dict[str, Any]:
        """Its ``/health`` answer (see :func:`sink_health`)."""
        return sink_health(self.settings.sink_web_port)

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Poll ``/health`` until the sink owns partitions; returns that answer."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.exit_code() is not None:
                raise SinkNotReady(f"sink exited with {self._process.exit_code()}:\n{tail(self.log_path)}")
            try:
                health = self.health()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                health = {}
            if health.get("partitions"):
                return health
            time.sleep(0.1)
        raise SinkNotReady(f"sink not ready after {timeout_s:.0f}s:\n{tail(self.log_path)}")

    def wait_caught_up(self, timeout_s: float = 60.0) -> dict[str, int]:
        """Wait until its group committed every record on the projected topics now (see
        :func:`streams.stack.progress.wait_sink_caught_up`)."""
        return wait_sink_caught_up(self.settings, timeout_s)
