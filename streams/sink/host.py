"""Keeps one process's ClickHouse sink running: opens the backend, runs the consumer loop, starts it again.

A worker hosts its sink in a thread with an event loop of its own (:meth:`SinkHost.start_thread`), so deciding
never waits on ClickHouse; ``ctxflow sink`` runs :meth:`SinkHost.serve` on its main loop. Either way the host

- opens the backend (:func:`~.ownership.open_backend`). A backend that does not answer (a server down, a chDB
  directory that cannot be written) is tried again with backoff; the process goes on meanwhile. A chDB
  directory another process holds is, with ``take_over``, tried again every :data:`TAKE_OVER_EVERY_S` (a second
  worker on the embedded stack decides without a sink and takes the sink over when the first one exits);
  without it :meth:`claim` raises :class:`~.ownership.BackendHeld`;
- announces itself as the chDB directory's owner, so queries find it (:mod:`.ownership`);
- runs a :class:`~.runner.SinkRunner` until stopped, and a new one should the loop fail (a bug: logged with its
  traceback; nothing is lost, the new one resumes from the committed offsets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

from ctxflow.sinks.clickhouse import ClickHouseSink
from ctxflow.streams.config import Settings
from ctxflow.streams.sink.backoff import Backoff
from ctxflow.streams.sink.ownership import BackendHeld, Owner, announce, open_backend, redacted, retire
from ctxflow.streams.sink.runner import SinkRunner
from ctxflow.streams.sink.status import SinkStatus

log = logging.getLogger(__name__)

#: How often a process without the chDB directory checks whether its holder let go.
TAKE_OVER_EVERY_S = 5.0


class SinkHost:
    """One process's ClickHouse sink (see the module docstring).

    ``role`` and ``query_url`` are what the owner file says of this process. ``runner_options`` go to every
    :class:`~.runner.SinkRunner` (batch size, flush interval). :meth:`status` and :meth:`health` may be called
    from any thread.
    """

    def __init__(self, settings: Settings, *, role: str, query_url: str | None, take_over: bool,
                 **runner_options: Any) -> None:
        self.settings = settings
        self.role = role
        self.query_url = query_url
        self.take_over = take_over
        self._runner_options = runner_options
        self._backend: ClickHouseSink | None = None
        self._runner: SinkRunner | None = None
        self._held: Owner | None = None
        self._held_seen = False
        self._open_error: str | None = None
        self._stop_asked = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def backend(self) -> ClickHouseSink | None:
        """The open backend (queries run on it), or None while this process does not hold one."""
        return self._backend

    def claim(self) -> None:
        """Try to open the backend now, so a process learns at once whether it writes ClickHouse.

        Raises :class:`~.ownership.BackendHeld` when another process holds the chDB directory and ``take_over``
        is off; any other failure is left for :meth:`serve` to retry.
        """
        try:
            self._open()
        except BackendHeld as held:
            if not self.take_over:
                raise
            self._note_held(held)
        except Exception as error:
            self._note_open_error(error)

    async def serve(self) -> None:
        """Run the sink until :meth:`stop`; closes the backend and withdraws the owner file on the way out."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        backoff = Backoff(first_s=1.0, cap_s=30.0)
        try:
            while not self._stop_asked:
                if self._backend is None:
                    delay = await self._reopen(backoff)
                    if delay:
                        await self._pause(delay)
                        continue
                assert self._backend is not None
                self._runner = SinkRunner(self.settings, self._backend, **self._runner_options)
                if self._stop_asked:  # stop() came before the runner it would have stopped existed
                    break
                try:
                    await self._runner.run()
                except Exception:
                    log.exception("clickhouse sink loop failed; starting it again from the committed offsets")
                    await self._pause(backoff.next())
        finally:
            if self._backend is not None:
                self._backend.close()
                retire(self.settings)

    def start_thread(self) -> None:
        """Run :meth:`serve` in a daemon thread with its own event loop."""
        self._thread = threading.Thread(target=asyncio.run, args=(self.serve(),), name="clickhouse-sink",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the sink to stop (after its last flush); with a thread, wait up to ``timeout_s`` for it."""
        self._stop_asked = True
        if self._runner is not None:
            self._runner.stop()
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("clickhouse sink did not stop in time; what it had not committed is written again "
                            "by the next sink", extra={"timeout_s": timeout_s})

    def status(self) -> SinkStatus | None:
        """The running sink's status, or None while this process runs none."""
        runner = self._runner
        return runner.status() if runner is not None and self._backend is not None else None

    def health(self) -> dict[str, Any]:
        """The ``sink`` part of ``/health``: the status when a sink runs here, else why none does."""
        status = self.status()
        if status is not None:
            return status.as_json()
        if self._held is not None or self._held_seen:
            owner = self._held
            return {"state": "elsewhere", "healthy": True, "owner_pid": owner.pid if owner else None,
                    "owner_role": owner.role if owner else None, "query_url": owner.query_url if owner else None}
        return {"state": "opening", "healthy": False, "last_error": self._open_error}

    def _open(self) -> None:
        self._backend = open_backend(self.settings)
        self._held, self._held_seen, self._open_error = None, False, None
        announce(self.settings, self.role, self.query_url)
        log.info("clickhouse sink holds its backend", extra={"backend": redacted(self._backend.dsn), "role": self.role})

    async def _reopen(self, backoff: Backoff) -> float:
        """Open the backend; the delay before the next attempt when that failed, else 0."""
        try:
            await asyncio.to_thread(self._open)
        except BackendHeld as held:
            if not self.take_over:
                raise
            self._note_held(held)
            return TAKE_OVER_EVERY_S
        except Exception as error:
            self._note_open_error(error)
            return backoff.next()
        backoff.reset()
        return 0.0

    def _note_held(self, held: BackendHeld) -> None:
        if not self._held_seen or held.owner != self._held:  # once per holder, not once per check
            log.warning(f"{held}; this process goes on without a ClickHouse sink (queries go to the holder) and "
                        "takes the sink over when the holder exits",
                        extra={"owner_pid": held.owner.pid if held.owner else None})
        self._held, self._held_seen = held.owner, True

    def _note_open_error(self, error: Exception) -> None:
        text = f"{type(error).__name__}: {error}"[:2000]
        if self._open_error is None:  # once per outage
            log.error("cannot open the ClickHouse backend; this process goes on and tries again with backoff",
                      extra={"dsn": redacted(self.settings.chdb_dsn), "error": text})
        self._open_error = text

    async def _pause(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
