"""The soak's publisher: the demo workload driven from a thread with an event loop of its own.

Publishing at the target rate keeps an event loop busy, on a loaded machine for seconds at a time (the SDK's
send rarely suspends), and everything the soak measures waits behind whatever holds its loop: a lag sample
taken late reads a record as older than it is, a probe's answer is noted late. Measured from a second process
while a soak ran on a busy 2-core machine, the oldest uncommitted record was 1-3 s old while the soak, sharing
its loop with the publisher, reported 5-9 s. In a thread of its own the publisher still shares the GIL, but the
measuring loop gets it back within the interpreter's switch interval (5 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable

from ctxflow.processors.pricing import usage_tokens
from ctxflow.schemas.models import TurnEvent, UsageReport
from ctxflow.streams.bench.soak_report import GroundTotals
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.harness import FairClient
from ctxflow.streams.demo.workload import DriveProgress, Workload, drive
from ctxflow.streams.sdk.records import TOPIC_OF
from ctxflow.streams.stack.worker_process import INPUT_TOPICS
from pydantic import BaseModel

__all__ = ["CountingClient", "Publisher"]

#: How long closing a Kafka client may take before it is abandoned (it waits on a broker that may not answer).
CLOSE_S = 10.0


class CountingClient(FairClient):
    """Counts what it queues for the worker's input topics, and per tenant what the budget must hold for it
    (memory candidates go to a topic the worker does not read)."""

    published = 0

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.truth = GroundTotals()

    async def publish(self, record: BaseModel) -> None:
        await super().publish(record)
        self.published += TOPIC_OF[type(record)].name in INPUT_TOPICS
        if isinstance(record, TurnEvent):
            self.truth.turns[record.tenant_id] += 1
            self.truth.turn_tokens[record.tenant_id] += record.token_count or 0
        elif isinstance(record, UsageReport):
            self.truth.usage_reports[record.tenant_id] += 1
            self.truth.usage_tokens[record.tenant_id] += usage_tokens(record)


class Publisher:
    """Publishes ``workload`` at ``rate_eps`` for ``duration_s``, then waits for every acknowledgement, from a
    thread of its own. :meth:`run` returns how far the drive got, or None when the broker had not acknowledged
    everything ``give_up_s`` after the end (a flush would wait for ever). Counts are readable while it runs."""

    def __init__(self, settings: Settings, workload: Workload, rate_eps: float, duration_s: float,
                 give_up_s: float, say: Callable[[str], None]) -> None:
        self.settings, self.workload, self.say = settings, workload, say
        self.rate_eps, self.duration_s, self.give_up_s = rate_eps, duration_s, give_up_s
        self.client = CountingClient.from_settings(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[DriveProgress | None] | None = None

    @property
    def published(self) -> int:
        """Records queued for the worker's input topics so far."""
        return self.client.published

    async def run(self) -> DriveProgress | None:
        """Drive in the thread and wait for it; cancelling this cancels the drive (and waits for the thread)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[DriveProgress | None] = loop.create_future()

        def settle(outcome: BaseException | DriveProgress | None) -> None:
            if done.done():
                return
            if isinstance(outcome, asyncio.CancelledError):
                done.cancel()
            elif isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)

        def main() -> None:
            try:
                outcome: BaseException | DriveProgress | None = asyncio.run(self._drive())
            except BaseException as error:  # handed to the soak's loop, which reports it
                outcome = error
            loop.call_soon_threadsafe(settle, outcome)

        thread = threading.Thread(target=main, name="soak-publisher", daemon=True)
        thread.start()
        try:
            return await done
        except asyncio.CancelledError:
            if self._loop is not None and self._task is not None:
                with contextlib.suppress(RuntimeError):  # its loop has just closed
                    self._loop.call_soon_threadsafe(self._task.cancel)
            await asyncio.to_thread(thread.join, CLOSE_S + 5)
            raise

    async def _drive(self) -> DriveProgress | None:
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()  # type: ignore[assignment]
        await self.client.start()
        try:
            async with asyncio.timeout(self.duration_s + self.give_up_s):
                sent = await drive(self.client, self.workload, self.rate_eps, self.duration_s)
                await self.client.flush()
                return sent
        except TimeoutError:
            self.say(f"the broker stopped acknowledging records: publishing had not finished {self.give_up_s:.0f}s "
                     "after its end; giving up")
            return None
        finally:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_S):
                    await self.client.stop()
