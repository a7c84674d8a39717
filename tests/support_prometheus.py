"""Prometheus for tests: Debian's ``prometheus`` package (``promtool`` and the server), installed once when missing,
and :class:`PrometheusServer`, a real server on a free loopback port that scrapes given targets.

The server gets a generated config and a storage directory of its own, runs as an attached child (it dies with
the test process), and is stopped on exit. Every wait polls its HTTP API against a deadline.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxflow.streams.stack.processes import ManagedProcess, free_port, tail

_PACKAGE = "prometheus"
_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", _PACKAGE]


@dataclass(frozen=True)
class PrometheusTools:
    """Paths of the two binaries tests use."""

    prometheus: Path
    promtool: Path


def _found() -> PrometheusTools | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    return PrometheusTools(Path(prometheus), Path(promtool)) if prometheus and promtool else None


def prometheus_tools() -> PrometheusTools:
    """``prometheus`` and ``promtool`` from PATH, installing Debian's ``prometheus`` package first when either is
    missing (tried once per test session). Raises ``RuntimeError`` saying what to do when that is impossible."""
    found = _installed()
    if isinstance(found, str):
        raise RuntimeError(found)
    return found


@functools.cache
def _installed() -> PrometheusTools | str:
    """The binaries, or why they could not be had (kept, so a failed install is not retried by every test)."""
    found = _found()
    if found is not None:
        return found
    if shutil.which("apt-get") is None:
        return (
            "promtool and prometheus are not on PATH and apt-get is unavailable: install the Prometheus 2.x "
            "server and promtool (Debian/Ubuntu package `prometheus`) and put both on PATH"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(_INSTALL, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:  # stale or empty package lists: refresh them once and try again
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
        done = subprocess.run(_INSTALL, env=env, capture_output=True, text=True, timeout=600)
    found = _found()
    if found is None:
        return (
            f"`{' '.join(_INSTALL)}` did not provide prometheus and promtool (it needs root and a reachable Debian "
            f"mirror); install the `prometheus` package by hand and run the tests again. apt said:\n"
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return found


def promtool_check_metrics(exposition: bytes) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics`` over ``exposition`` (text format on stdin): exit 0 and no output when it is
    valid and lint-clean."""
    return subprocess.run([str(prometheus_tools().promtool), "check", "metrics"], input=exposition.decode(),
                          capture_output=True, text=True, timeout=60)


class PrometheusServer:
    """A Prometheus server on ``127.0.0.1:<free port>`` scraping ``targets`` (``host:port``) at ``/metrics``
    every ``scrape_interval_s``, with its config and storage under ``home``; stopped (no process left) on exit."""

    def __init__(self, home: Path, targets: list[str], *, job: str = "ctxflow-worker",
                 scrape_interval_s: float = 1.0) -> None:
        self.home, self.port, self.job = home, free_port(), job
        home.mkdir(parents=True, exist_ok=True)
        config = home / "prometheus.yml"
        interval = f"{int(scrape_interval_s * 1000)}ms"
        # JSON is YAML: no YAML writer needed.
        config.write_text(json.dumps({
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": [{"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}],
        }))
        argv = [
            str(prometheus_tools().prometheus), f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ]
        self.log_path = home / "prometheus.log"
        self._process = ManagedProcess("prometheus", argv, self.log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 30.0) -> PrometheusServer:
        """Start the server and wait until it answers ``/-/ready``."""
        self._process.start()
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not self._ready():
                if self._process.exit_code() is not None:
                    raise RuntimeError(f"prometheus exited with {self._process.exit_code()}:\n{tail(self.log_path)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus not ready after {ready_timeout_s}s:\n{tail(self.log_path)}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """The ``data`` of a successful ``GET /api/v1/<path>``; raises on an API error."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus answered {body}")
        return body["data"]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, with ``health`` (``up``/``down``/``unknown``) and ``lastError``."""
        return list(self.api("targets", state="active")["activeTargets"])

    def query(self, expr: str) -> dict[str, float]:
        """An instant query's samples as ``{label set as text: value}`` (``{}`` when nothing matches yet)."""
        data = self.api("query", query=expr)
        return {json.dumps(sample["metric"], sort_keys=True): float(sample["value"][1]) for sample in data["result"]}

    def stop(self) -> None:
        self._process.stop()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
