"""A summarizer worker child process (``python -m ctxflow.streams.summarizer``), for tests and the embedded stack.

Like :class:`~streams.stack.worker_process.WorkerProcess`: its own process because that is how it is deployed
and scaled, and because fault tests must be able to SIGKILL it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ctxflow.streams.config import Settings
from ctxflow.streams.stack.processes import ServiceProcess, tail
from ctxflow.streams.stack.worker_process import settings_env

#: The log line a summarizer writes once its group gave it partitions (logfmt, see ``streams.logs``).
READY_LINE = 'msg="partitions assigned"'


class SummarizerNotReady(RuntimeError):
    """The summarizer did not get partitions before the deadline (its log tail is in the message)."""


class SummarizerProcess(ServiceProcess):
    """One summarizer child process bound to ``settings``; ready once its group gave it partitions.

    ``env`` adds environment variables, e.g. ``CTXFLOW_SUMMARIZER_URL`` and ``CTXFLOW_SUMMARIZER_MODEL`` for the
    endpoint summarizer (the parent's own ``CTXFLOW_*`` variables are not passed on: ``settings`` are). Stopped,
    what it had not committed is summarized again by the next summarizer of its group, with the same ids.
    """

    ready_timeout_s = 30.0

    def __init__(self, settings: Settings, log_path: Path | None = None, name: str = "summarizer", *,
                 batch_max: int = 64, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        argv = [sys.executable, "-m", "ctxflow.streams.summarizer", "--loglevel", "info",
                "--batch-max", str(batch_max)]
        super().__init__(name, argv, log_path or settings.home / "logs" / f"{name}.log",
                         {**settings_env(settings), **(env or {})})

    def wait_ready(self, timeout_s: float) -> None:
        """Poll the log until the summarizer owns partitions; raise :class:`SummarizerNotReady` otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.exit_code() is not None:
                raise SummarizerNotReady(f"summarizer exited with {self._process.exit_code()}:\n{tail(self.log_path)}")
            if self.log_path.exists() and READY_LINE in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise SummarizerNotReady(f"summarizer not ready after {timeout_s:.0f}s:\n{tail(self.log_path)}")
