"""A Faust app whose Kafka consumer runs on the app's own event loop and waits at most ``fetch_max_wait_ms``.

Faust's aiokafka driver runs the consumer in a thread of its own with a second event loop, and every fetch,
seek and commit crosses threads through method queues. On a worker whose main thread is busy deciding, each
crossing waits for the GIL (up to the 5 ms switch interval, several times per fetch): records reached the
intake 20-60 ms after they were produced, where a plain aiokafka consumer on the same broker saw them after
~8 ms. :class:`_LoopConsumerThread` keeps Faust's consumer service and its rebalance handling but runs it as a
service on the app's loop, and calls what Faust would queue for the thread directly.

Faust's aiokafka driver also hard-codes ``fetch_max_wait_ms=1500``. Tansu (the embedded broker) holds a fetch
for about half that long before answering even when data arrives, which would put ~0.4-0.75 s of latency on
every record; the app's consumer waits ``Settings.fetch_max_wait_ms`` instead (25 ms by default, for Tansu).
Apache Kafka answers a fetch as soon as data arrives, so deployments on it set a long wait: at 5 ms an idle
worker sent ~150 empty fetches a second (measured here: 0.15 cores of the worker, 0.2 of the broker).

Faust's stream monitors are replaced by :mod:`streams.runtime.health`: they judged the input partitions by
Faust streams the worker does not feed (input records bypass them, :mod:`streams.runtime.intake`) and the
changelog partitions by fetches the consumer pauses on purpose, and logged an ERROR for each every few
seconds (25,264 lines in 18 minutes of one run). The consumer keeps a :class:`~streams.runtime.health.CommitClock`
and, where Faust ran its monitors, logs once when partitions stall and once when they recover.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Set
from typing import Any

import aiokafka
import faust
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.health import CommitClock, PartitionObservation, StallWatch, WorkerHealth, assess
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.utils.futures import maybe_async

log = logging.getLogger(__name__)


_FETCH_MAX_BYTES = 2 << 20


class _LoopConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer "thread" as a service on the app's loop: same start/stop sequence, no thread.

    ``ServiceThread.start`` would run :meth:`_serve` (start, serve until stopped, shut down) in a new thread;
    here it is a task on the caller's loop. Calls meant for the thread are made directly.
    """

    def __init__(self, consumer: Any, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(consumer, loop=loop, thread_loop=loop, **kwargs)
        self._serving: asyncio.Future[None] | None = None

    async def start(self) -> None:
        assert not self._thread_started.is_set()
        self._thread_started.set()
        self._thread_running = running = self.parent_loop.create_future()
        self._serving = asyncio.ensure_future(self._serve())
        try:
            await running  # set by _serve once started, or failed with the start-up error
        finally:
            self._thread_running = None

    async def stop(self) -> None:
        await super().stop()
        if self._serving is not None:
            await self._serving

    async def _gather_remaining_tasks(self) -> None:
        # The thread's version cancels every task of its loop, which here is the whole app's.
        return None

    async def call_thread(self, fun: Callable[..., Awaitable], *args: Any, **kwargs: Any) -> Any:
        return await maybe_async(fun(*args, **kwargs))

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher, so setting it here takes effect.
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        # The embedded broker reads a partition one stored batch at a time, each read listing every batch the
        # partition holds, so a fetch's cost is (batches returned + 1) x batches stored. A worker far behind asked
        # for 5 MB of ~2-record batches (thousands of reads) and its fetches outgrew the request timeout: sent
        # again and again, none answered, nothing committed. 2 MB (~1,700 turns) bounds that work and still
        # passes ~80 MB/s at a 25 ms fetch wait, far above what one worker decides.
        consumer._fetch_max_bytes = _FETCH_MAX_BYTES
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commit_clock = CommitClock()
        self._stall_watch = StallWatch()

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _LoopConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def on_partitions_assigned(self, assigned: Set[TP], generation_id: int = 0) -> None:
        self.commit_clock.assigned(assigned, time.monotonic())
        await super().on_partitions_assigned(assigned, generation_id)

    async def _commit_offsets(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        did_commit = await super()._commit_offsets(offsets, start_new_transaction=start_new_transaction)
        if did_commit:
            self.commit_clock.committed(offsets, time.monotonic())
        return bool(did_commit)

    def health(self) -> WorkerHealth:
        """Progress of every partition this worker owns and commits (not changelogs), from what the consumer already
        knows (no broker request); ``starting`` while it owns none, rebalances or recovers its tables."""
        app, consumer, now = self.app, self._thread._consumer, time.monotonic()
        if consumer is None or app.rebalancing or getattr(app, "in_recovery", False):
            return assess([], now, app.stall_after_s)  # type: ignore[attr-defined]  (ShortFetchApp)
        # Changelogs are read only while recovering, the leader topic never: neither is committed.
        uncommitted = app.tables.changelog_topics | set(self.randomly_assigned_topics)
        wall_ms, observations = time.time() * 1000, []
        for tp in consumer.assignment():
            if tp.topic in uncommitted:
                continue
            polled_ms = consumer.last_poll_timestamp(tp)  # wall clock, when the last fetch response came
            fetched_at = None if polled_ms is None else now - max(0.0, wall_ms - polled_ms) / 1000
            highwater, committed = consumer.highwater(tp), self._committed_offset.get(tp)
            if fetched_at is not None and highwater is not None and highwater <= (committed or 0):
                # Sampled here (every 2.5 commit intervals, and per request): close enough for a threshold
                # of tens of seconds.
                self.commit_clock.caught_up(tp, fetched_at)
            observations.append(PartitionObservation(
                tp.topic, tp.partition, highwater, committed, self.commit_clock.since(tp, now), fetched_at,
                self.commit_clock.caught_up_at(tp),
            ))
        return assess(observations, now, app.stall_after_s)  # type: ignore[attr-defined]

    async def verify_all_partitions_active(self) -> None:
        # Faust's livelock detector calls this every 2.5 commit intervals: our check instead of its monitors.
        change = self._stall_watch.update(self.health())
        if change is None:
            return
        if change.degraded:
            log.error(
                "input partitions stalled: no commit advanced for longer than stall_after_s while records wait "
                "or fetches go unanswered; the worker is degraded (GET /health, `ctxflow status`): check that the "
                "broker, Redis and ClickHouse answer, and this log above",
                extra={"stalled": " ".join(f"{p.topic}[{p.partition}]:lag={p.lag}" for p in change.degraded),
                       "last_commit_age_s": round(max(p.last_commit_age_s for p in change.degraded)),
                       "stall_after_s": self.app.stall_after_s},  # type: ignore[attr-defined]
            )
        if change.recovered:
            log.warning("input partitions progress again", extra={"recovered": " ".join(change.recovered)})

    def verify_event_path(self, now: float, tp: TP) -> None:
        return None  # Faust's monitor: false here (see the module docstring); verify_all_partitions_active replaces it

    # Faust pauses a partition by leaving it out of what it takes from aiokafka's fetcher, which goes on
    # fetching it: every fetch request named every changelog partition too (twice the partitions per request,
    # each one parsed in Python here and listed in storage by the broker). Pausing in aiokafka as well keeps
    # them out of the requests.
    def pause_partitions(self, tps: Iterable[TP]) -> None:
        super().pause_partitions(tps)
        self._fetch_only_active()

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        super().resume_partitions(tps)
        self._fetch_only_active()

    def _fetch_only_active(self) -> None:
        consumer = self._thread._consumer
        if consumer is None:
            return
        active, assigned = self._get_active_partitions(), consumer.assignment()
        consumer.pause(*(tp for tp in assigned if tp not in active))
        consumer.resume(*(tp for tp in assigned if tp in active))


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class ShortFetchApp(faust.App):
    """``faust.App`` whose consumer runs on the app's loop with a short fetch wait (see module docstring)."""

    #: The consumer's fetch wait in milliseconds; set it before the app starts.
    fetch_max_wait_ms: int = Settings.model_fields["fetch_max_wait_ms"].default
    #: Seconds without a commit advance, while records wait, after which an input partition is degraded.
    stall_after_s: float = Settings.model_fields["stall_after_s"].default

    def _new_transport(self) -> faust_aiokafka.Transport:
        return _Transport(self.conf.broker_consumer, self)
