"""Child-process supervision for the embedded stack: spawn with a log file, stop without orphans.

Two ownership modes. *Attached* children (tests, ``ctxflow up --foreground``) are tied to the thread that
spawned them with ``PR_SET_PDEATHSIG`` on Linux, so even a SIGKILLed parent leaves nothing behind.
*Detached* children (``ctxflow up``) get their own session and outlive the CLI; ``ctxflow down`` finds them
again by pid and start time, which guards against signalling a recycled pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Loaded before any fork: resolving a library inside preexec_fn could take the loader lock in the child.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listened on a moment ago (the OS picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def start_time_of(pid: int) -> int | None:
    """The kernel's start time of ``pid`` in clock ticks (Linux), or None when unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so split after its closing parenthesis.
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True while ``pid`` runs (zombies count as gone) and, if given, still has ``start_time``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return start_time is None or start_time_of(pid) in (None, start_time)


def stop_pid(pid: int, start_time: int | None = None, grace_s: float = 5.0) -> None:
    """Stop a process we do not parent: SIGTERM, wait up to ``grace_s``, then SIGKILL and wait again."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid, start_time):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and pid_alive(pid, start_time):
            time.sleep(0.02)
    if pid_alive(pid, start_time):
        raise RuntimeError(f"process {pid} survived SIGKILL")


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"<no log at {path}>"


class ManagedProcess:
    """One server child whose output goes to ``log_path``; ``stop()`` leaves no process behind."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        detached: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.detached = detached
        self.env = env
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The child's pid; only valid after ``start()``."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.pid

    def start(self) -> None:
        """Spawn the child: attached, it dies with the spawning thread; detached, it gets a new session."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detached,
                preexec_fn=None if self.detached else _die_with_parent(os.getpid()),
                env=self.env,
            )
        logger.info("started %s pid=%d: %s", self.name, self._popen.pid, " ".join(self.argv))

    def exit_code(self) -> int | None:
        """The child's exit status if it has exited, else None."""
        return None if self._popen is None else self._popen.poll()

    def kill(self) -> None:
        """SIGKILL the child (a crash, for fault tests) and reap it."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()
            self._popen.wait()
            logger.info("killed %s pid=%d", self.name, self.pid)

    def stop(self, grace_s: float = 5.0) -> None:
        """Terminate, wait up to ``grace_s``, then kill; always reaps the child. Safe to call twice."""
        if self._popen is None or self._popen.poll() is not None:
            return
        self._popen.terminate()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._popen.pid, signal.SIGCONT)  # a stopped child (SIGSTOP, Ctrl-Z) acts on SIGTERM once continued
        try:
            self._popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s pid=%d ignored SIGTERM for %.1fs; killing", self.name, self.pid, grace_s)
            self._popen.kill()
            self._popen.wait()
        logger.info("stopped %s pid=%d", self.name, self.pid)


class ServiceProcess(ABC):
    """A ctxflow service in a child process (a sink, a summarizer): ready once :meth:`wait_ready` returns, stopped
    without leaving anything behind. Subclasses say how readiness shows and how long it may take."""

    #: How long :meth:`start` waits for readiness by default.
    ready_timeout_s = 60.0

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._process = ManagedProcess(name, argv, log_path, env=env)

    @property
    def pid(self) -> int:
        return self._process.pid

    def exit_code(self) -> int | None:
        """The exit status once it has exited, else None."""
        return self._process.exit_code()

    def start(self, ready_timeout_s: float | None = None) -> Self:
        """Spawn the child and wait until it is ready (stopping it if it never gets there)."""
        self._process.start()
        try:
            self.wait_ready(self.ready_timeout_s if ready_timeout_s is None else ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    @abstractmethod
    def wait_ready(self, timeout_s: float) -> object:
        """Return once the service works; raise (with its log's tail) when it exited or ``timeout_s`` passed."""

    def kill(self) -> None:
        """SIGKILL the child (a crash)."""
        self._process.kill()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop gracefully (SIGTERM), killing after ``grace_s``: what it had not committed is done again by the
        next member of its consumer group (every effect is idempotent)."""
        self._process.stop(grace_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
