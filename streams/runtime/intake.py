"""Bulk delivery of input-topic messages from Faust's consumer to the budget agent.

Input records do not travel through Faust streams. Faust hands each message to its conductor, channel queue
and stream (two tasks and three queue hops per message), which costs ~100 us of CPU per message and caps a
worker at a few thousand events/s; a no-op bulk path measured ~17 us. The worker's consumer therefore drains
input-topic messages into a :class:`BatchIntake` a fetch at a time; the budget agent takes everything buffered
(up to ``batch_max``) as soon as it is free, so batches grow under load and stay small (low latency) when
idle. Changelog records that Faust's recovery reads (those written after the bulk preload of
:mod:`streams.runtime.recovery`) still go through Faust's own path. The intake keeps Faust's rebalance contract:
messages handed to the agent are tracked as in flight (a rebalance waits for their acknowledgement, as for
stream events), a rebalance clears what is buffered (it is fetched again from the committed offsets), and
messages of an older consumer generation are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import faust
from ctxflow.streams.runtime.transport import ShortFetchApp, _Consumer, _Transport
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from mode import ServiceT
from mode.utils.futures import notify

log = logging.getLogger(__name__)


class IntakeGap(RuntimeError):
    """A partition's input offsets jumped: processing on would skip records (see :class:`OffsetContinuity`)."""


class OffsetContinuity:
    """The offset each input partition's next message must have, so no record is ever applied over a hole.

    Input offsets are contiguous (no compaction, no transaction markers), so a partition's next message
    follows on from the last one handed out, or repeats an earlier one (a seek back to the committed offset);
    the first one in a consumer generation (every rebalance seeks each partition to its committed offset) is
    the committed offset. Anything later would apply records over unprocessed ones, which no commit can pass
    and a restart would skip for good.
    """

    def __init__(self) -> None:
        self._next: dict[TP, int] = {}
        self._generation: int | None = None

    def admit(self, generation: int, tp: TP, offset: int, committed: int | None) -> None:
        """Record ``offset`` as handed out, or raise :class:`IntakeGap` if it skips any record."""
        if generation != self._generation:
            self._generation = generation
            self._next.clear()
        expected = self._next.get(tp, committed)
        if expected is not None and 0 <= expected < offset:
            raise IntakeGap(
                f"{tp.topic}[{tp.partition}]: offset {offset} follows {expected - 1}; offsets {expected}..{offset - 1} "
                "were never handed to the pipeline. Input topics must be written without transactions or "
                "compaction; otherwise this is a bug: restart the worker (it resumes from the last commit) and "
                "report it"
            )
        self._next[tp] = offset + 1


class BatchIntake:
    """Input-topic messages on their way from the consumer's drain loop to the budget agent, in bulk.

    ``put`` appends a fetch's messages (waiting while ``max_buffered`` are pending, and while a rebalance
    suspends flow); ``take`` returns up to ``limit`` of them as soon as any are buffered, marked in flight.
    ``take`` drops messages fetched before the latest rebalance (older consumer generation, or taken while
    flow is suspended): the rebalance ends by seeking to the committed offsets, so they are fetched again.
    The intake is deliberately not one of the flow-control managed queues: Faust clears those on *every*
    ``flow_control.resume()``, including the one right after that seek, which would drop messages already
    fetched from the new positions and leave a gap no later commit can pass.
    """

    def __init__(self, app: faust.App, topics: set[str], max_buffered: int) -> None:
        self.app = app
        self.topics = topics
        self._max = max_buffered
        self._buffer: list[Message] = []
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._continuity = OffsetContinuity()

    async def put(self, messages: list[Message]) -> None:
        """Buffer ``messages`` (a fetch, in offset order per partition); waits while flow is suspended."""
        await self.app.flow_control.acquire()
        while len(self._buffer) >= self._max:
            self._room.clear()
            await self._room.wait()
        self._buffer.extend(messages)
        self._ready.set()

    def _fresh(self, taken: list[Message]) -> list[Message]:
        """``taken`` without messages fetched under an older consumer generation; refuses a gap."""
        generation = self.app.consumer_generation_id
        committed = self.app.consumer._committed_offset  # type: ignore[attr-defined]
        fresh = []
        for message in taken:
            if message.generation_id == generation:
                self._continuity.admit(generation, message.tp, message.offset, committed.get(message.tp))
                fresh.append(message)
        if len(fresh) < len(taken):
            log.info("intake dropped messages of an older generation", extra={"count": len(taken) - len(fresh)})
        return fresh

    async def take(self, limit: int) -> list[Message]:
        """The next ``limit`` or fewer messages, oldest first, tracked as in flight until acknowledged."""
        while True:
            while not self._buffer:
                self._ready.clear()
                await self._ready.wait()
            taken = self._buffer[:limit]
            del self._buffer[:limit]
            self._room.set()
            if not self.app.flow_control.is_active():
                log.info("intake dropped messages taken during a rebalance", extra={"count": len(taken)})
                continue
            fresh = self._fresh(taken)
            # Consumer.track_message without its per-message sensor calls, as Faust's own Stream inlines it.
            in_flight = self.app.consumer._unacked_messages.add  # type: ignore[attr-defined]
            for message in fresh:
                message.tracked = True
                in_flight(message)
            if fresh:
                return fresh


class BulkConsumer(_Consumer):
    """Faust's consumer, except that input-topic messages go to the app's :class:`BatchIntake` in bulk."""

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover (runs in every worker)
        # Faust's loop (faust.transport.consumer.Consumer._drain_messages) with one change: messages of the
        # intake's topics are collected and handed over per fetch instead of one callback (two tasks) each.
        intake: BatchIntake = self.app.intake  # type: ignore[attr-defined]
        callback, getmany = self.callback, self.getmany
        consumer_stopped, fetcher_stopped = self._stopped.is_set, fetcher._stopped.is_set  # type: ignore[attr-defined]
        get_read_offset, set_read_offset = self._read_offset.__getitem__, self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                fetched: list[Message] = []
                await asyncio.sleep(0)
                since_yield = 0
                async for tp, message in getmany(timeout=1.0):
                    # No await from here until the read offset is set: a rebalance completing in between would
                    # seek the partition back, and setting the read offset of this older message afterwards
                    # would make the consumer skip the re-fetched records (getmany checks the generation only
                    # before it yields).
                    offset, read = message.offset, get_read_offset(tp)
                    if read is not None and offset < read:
                        continue  # already delivered (fetched again after a seek)
                    if message.topic in intake.topics:
                        # No gap bookkeeping: input offsets are contiguous (no compaction, no transaction
                        # markers), so a jump only means a fetch from before a seek; marking the skipped
                        # offsets acknowledged would commit records nobody processed.
                        fetched.append(message)
                        set_read_offset(tp, offset)
                        since_yield += 1
                        if since_yield >= 128:  # a fetch may hold thousands: let decisions and commits through
                            since_yield = 0
                            await asyncio.sleep(0)
                        continue
                    if read and offset - read > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, read + 1, offset)
                    # Changelog records Faust's recovery reads after the bulk preload, and anything else:
                    # Faust's conductor path, unchanged.
                    await self.wait_first(callback(message), self.suspend_flow.wait())
                    set_read_offset(tp, offset)
                if fetched:
                    await intake.put(fetched)
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise

    def ack_all(self, messages: Iterable[Message]) -> None:
        """``Consumer.ack`` for many messages: one lock and one notification, not one each (~2 us a message).

        Unlike ``ack`` it also forgets a message that was already committed (a replay after a seek), which
        ``ack`` leaves in the in-flight set until it is garbage collected.
        """
        enabled = self.app.topics.acks_enabled_for
        committed, index, acked = self._committed_offset, self._acked_index, self._acked
        in_flight = self._unacked_messages
        added = 0
        with ack_lock:
            for message in messages:
                if message.acked:
                    continue
                message.acked = True
                in_flight.discard(message)
                if not enabled(message.topic):
                    continue
                tp, offset = message.tp, message.offset
                floor, seen = committed[tp], index[tp]
                if (floor is None or offset >= floor) and offset not in seen:
                    seen.add(offset)
                    acked[tp].append(offset)
                    added += 1
            self._n_acked += added
        notify(self._waiting_for_ack)


class _BulkTransport(_Transport):
    Consumer = BulkConsumer


class BudgetApp(ShortFetchApp):
    """The worker's Faust app: short fetch waits and bulk intake of input topics (see module docstring)."""

    intake: BatchIntake

    def _new_transport(self) -> _Transport:
        return _BulkTransport(self.conf.broker_consumer, self)
