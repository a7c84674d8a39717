"""The soak's worker child, and its successor after a SIGKILL."""

from __future__ import annotations

import asyncio
import threading
import time

from ctxflow.streams.config import Settings
from ctxflow.streams.stack.worker_process import WorkerProcess

__all__ = ["WorkerSuccession"]


class WorkerSuccession:
    """The worker child, and its successor after a SIGKILL. The successor is started from a thread that lives
    until the soak ends: an attached child dies with the thread that spawned it, and the event loop must keep
    publishing and measuring while the new worker recovers its tables."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current = WorkerProcess(settings).start()
        self.replacing = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    async def replace(self) -> float:
        """SIGKILL the worker, start another on the same settings; seconds until it owned its partitions."""
        loop, self.replacing = asyncio.get_running_loop(), True
        ready: asyncio.Future[float] = loop.create_future()

        def run() -> None:
            began = time.monotonic()
            try:
                self.current.kill()
                successor = WorkerProcess(self.settings).start()
            except BaseException as error:  # handed to the event loop, which reports it
                loop.call_soon_threadsafe(ready.set_exception, error)
                return
            self.current = successor
            loop.call_soon_threadsafe(ready.set_result, time.monotonic() - began)
            self._done.wait()
            successor.stop()

        self._thread = threading.Thread(target=run, name="soak-worker", daemon=True)
        self._thread.start()
        try:
            return await ready
        finally:
            self.replacing = False

    def stop(self) -> None:
        """Stop whichever worker runs (through the thread that started it, if a successor)."""
        if self._thread is None:
            self.current.stop()
            return
        self._done.set()
        self._thread.join()
