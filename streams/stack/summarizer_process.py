"""A summarizer worker child process (``python -m ctxflow.streams.summarizer``), for tests and the embedded stack.

Like :class:`~streams.stack.worker_process.WorkerProcess`: its own process because that is how it is deployed
and scaled, and because fault tests must be able to SIGKILL it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ctxflow.streams.config import Settings
from ctxflow.streams.stack.processes import ManagedProcess, tail
from ctxflow.streams.stack.worker_process import settings_env

#: The log line a summarizer writes once its group gave it partitions (logfmt, see ``streams.logs``).
READY_LINE = 'msg="partitions assigned"'


class SummarizerNotReady(RuntimeError):
    """The summarizer did not get partitions before the deadline (its log tail is in the message)."""


class SummarizerProcess:
    """One summarizer child process bound to ``settings``.

    ``env`` adds environment variables, e.g. ``CTXFLOW_SUMMARIZER_URL`` and ``CTXFLOW_SUMMARIZER_MODEL`` for the
    endpoint summarizer (the parent's own ``CTXFLOW_*`` variables are not passed on: ``settings`` are).
    """

    def __init__(self, settings: Settings, log_path: Path | None = None, name: str = "summarizer", *,
                 batch_max: int = 64, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_path = log_path or settings.home / "logs" / f"{name}.log"
        argv = [sys.executable, "-m", "ctxflow.streams.summarizer", "--loglevel", "info",
                "--batch-max", str(batch_max)]
        self._process = ManagedProcess(name, argv, self.log_path, env={**settings_env(settings), **(env or {})})

    @property
    def pid(self) -> int:
        return self._process.pid

    def exit_code(self) -> int | None:
        """The exit status once it has exited, else None."""
        return self._process.exit_code()

    def start(self, ready_timeout_s: float = 30.0) -> SummarizerProcess:
        """Spawn the summarizer and wait until its group assigned it partitions (stopping it if that never
        happens)."""
        self._process.start()
        try:
            self.wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

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

    def kill(self) -> None:
        """SIGKILL the summarizer (a crash)."""
        self._process.kill()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop gracefully (SIGTERM), killing after ``grace_s``; what it had not committed is summarized again by
        the next summarizer of its group, with the same ids."""
        self._process.stop(grace_s)

    def __enter__(self) -> SummarizerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
