"""Producers for worker tests: publish a batch of records, or keep a workload flowing from a background thread.

:class:`BackgroundTraffic` is what "producers keep sending" means in the fault tests: a thread with its own
event loop and ``CtxflowClient`` publishes a :class:`~streams.demo.workload.Workload` at a steady rate while the
test kills and restarts the worker, and re-publishes some earlier events unchanged (same event id, seq and
call id) at new offsets, as an SDK retrying an unacknowledged send would.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterable

from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.sdk import CtxflowClient
from pydantic import BaseModel

#: How far back a re-sent event may lie (an SDK retries what is still in flight, so recent events).
RETRY_HORIZON = 400


def publish(settings: Settings, records: Iterable[BaseModel]) -> None:
    """Publish ``records`` in order through the SDK and wait until every one is acknowledged."""

    async def send() -> None:
        async with CtxflowClient.from_settings(settings) as client:
            for record in records:
                await client.publish(record)

    asyncio.run(send())


def send_raw(settings: Settings, items: Iterable[tuple[str, bytes | None, bytes]]) -> None:
    """Produce ``(logical topic, key, value)`` byte records as they are, acknowledged before returning."""

    async def send() -> None:
        async with CtxflowClient.from_settings(settings) as client:
            for topic, key, value in items:
                await client.send_raw(settings.topic(topic), key, value)

    asyncio.run(send())


class BackgroundTraffic:
    """A workload published from a background thread at ``rate_eps`` until :meth:`stop`.

    Guarantees: when :meth:`stop` returns, every record in its result was acknowledged by the broker (or it
    raised); the result lists records in publish order, re-sent duplicates included.
    """

    def __init__(self, settings: Settings, workload: Workload, *, rate_eps: float, duplicate_share: float,
                 seed: int) -> None:
        self._settings, self._workload = settings, workload
        self._rate_eps, self._duplicate_share = rate_eps, duplicate_share
        self._rng = random.Random(seed)
        self._sent: list[BaseModel] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="traffic", daemon=True)

    @property
    def published(self) -> int:
        """Records handed to the producer so far (duplicates included)."""
        return len(self._sent)

    def start(self) -> BackgroundTraffic:
        """Start publishing."""
        self._thread.start()
        return self

    def wait_published(self, at_least: int, timeout_s: float = 30.0) -> None:
        """Block until ``at_least`` records were handed to the producer."""
        deadline = time.monotonic() + timeout_s
        while self.published < at_least:
            if self._error is not None or not self._thread.is_alive():
                raise AssertionError(f"traffic stopped after {self.published} records: {self._error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.published} of {at_least} records published in {timeout_s}s")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 60.0) -> list[BaseModel]:
        """Stop, wait for every acknowledgement, and return what was published."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"traffic thread did not finish within {timeout_s}s")
        if self._error is not None:
            raise AssertionError(f"publishing failed: {self._error!r}") from self._error
        return list(self._sent)

    def cancel(self) -> None:
        """Stop without reporting (cleanup after a failed test; :meth:`stop` reports)."""
        self._stop.set()
        self._thread.join(30)

    def _main(self) -> None:
        try:
            asyncio.run(self._publish())
        except BaseException as error:  # reported by stop() in the test's thread
            self._error = error

    async def _publish(self) -> None:
        loop = asyncio.get_running_loop()
        async with CtxflowClient.from_settings(self._settings) as client:
            began = loop.time()
            for event in self._workload.events():
                if self._stop.is_set():
                    break
                ahead = began + len(self._sent) / self._rate_eps - loop.time()
                if ahead > 0.002:  # pacing to the target rate, not waiting for anything to happen
                    await asyncio.sleep(ahead)
                await client.publish(event)
                self._sent.append(event)
                if self._rng.random() < self._duplicate_share:
                    again = self._rng.choice(self._sent[-RETRY_HORIZON:])
                    await client.publish(again)
                    self._sent.append(again)
