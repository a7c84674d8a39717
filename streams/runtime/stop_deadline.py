"""A bound on how long a process may take to stop once asked to (SIGTERM or SIGINT).

A graceful stop awaits things that can hang for good: a commit or a group leave sent to a broker that no
longer answers, a producer flushing to it, a child server that ignores SIGTERM. :class:`StopDeadline` is
armed by the first stop signal; if the process is still alive ``seconds`` later it logs that it abandons the
graceful stop and leaves with ``os._exit``, which runs no more cleanup. That is safe for ctxflow because
nothing depends on a clean exit: offsets are committed only over durable effects, so batches not committed
yet are replayed after a restart, and every effect is idempotent under replay; attached child processes die
with their parent (``PR_SET_PDEATHSIG``, see :mod:`streams.stack.processes`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: How long a graceful stop may take before it is abandoned: under the 10 s that ``ctxflow worker``,
#: ``ctxflow demo`` and ``ctxflow up --foreground`` promise, with room for the exit itself.
STOP_DEADLINE_S = 8.0


class StopDeadline:
    """Once :meth:`arm` is called, the process exits within ``seconds`` (plus one as a last resort).

    Guarantees: the first :meth:`arm` starts the clock and later calls change nothing; at the deadline one
    ERROR line says what was abandoned, then ``os._exit(exit_code)``. Should that thread not get to run (a
    C call holding the GIL), ``SIGALRM`` with its default action ends the process one second later.
    """

    def __init__(self, what: str, consequence: str, seconds: float = STOP_DEADLINE_S, exit_code: int = 1) -> None:
        self.what = what
        self.consequence = consequence
        self.seconds = seconds
        self.exit_code = exit_code
        self._armed_at: float | None = None

    @property
    def armed(self) -> bool:
        """True once a stop was asked for."""
        return self._armed_at is not None

    def arm(self, reason: str) -> None:
        """Start the clock (idempotent); safe to call from a signal handler."""
        # No lock: signal handlers run one at a time on the main thread, and should a second one slip in
        # between the test and the set, two timers end the process at the same moment.
        if self._armed_at is not None:
            return
        self._armed_at = time.monotonic()
        timer = threading.Timer(self.seconds, self._abandon, args=(reason,))
        timer.daemon = True
        timer.start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(self.seconds) + 1)

    def _abandon(self, reason: str) -> None:
        log.error(
            f"{self.what} did not stop within {self.seconds:.0f}s of {reason}; abandoning the graceful stop: "
            f"{self.consequence}",
            extra={"reason": reason, "deadline_s": self.seconds},
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(self.exit_code)


def stop_on_signals(deadline: StopDeadline, stop: Callable[[], None]) -> None:
    """On SIGTERM or SIGINT, in the running event loop: log it, arm ``deadline`` and call ``stop``."""

    def on_signal(name: str) -> None:
        log.info("stopping", extra={"signal": name})
        deadline.arm(name)
        stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
