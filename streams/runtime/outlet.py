"""Decisions and dead letters gathered for a short linger, then produced as one batch per partition.

The worker decides a batch per fetch under load (every ~10-30 ms), and producing each batch's decisions on
its own made a decisions batch per fetch. The embedded broker's produce and fetch cost grows with the batches a
partition stores, so those small batches made every later produce dearer and every subscriber's fetch slower,
for as long as the broker ran (issue: throughput fell to zero within minutes at 1,500 events/s). A
:class:`DecisionOutlet` holds what the pipeline sends for ``linger_s`` after the first record arrives and then
produces everything gathered through one :class:`~streams.runtime.tables.BatchProducer` call. An *urgent*
send (the batch answers an admission request, which an agent waits on) releases the gathering at once, with
whatever it already holds.

Guarantees: :meth:`DecisionOutlet.send` returns once the broker acknowledged the records it was given (or raises
what their produce raised), so the commit order of :mod:`streams.runtime.pipeline` holds unchanged; records keep
their order per partition (gatherings are produced one after another and aiokafka keeps per-partition order).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from ctxflow.streams.runtime.tables import BatchProducer, OutRecord


class DecisionOutlet:
    """Coalesces :meth:`send` calls made within ``linger_s`` of each other into one produce."""

    def __init__(self, producer: BatchProducer, linger_s: float) -> None:
        self._producer = producer
        self._linger_s = linger_s
        self._pending: list[OutRecord] = []
        self._gathering: asyncio.Future[None] | None = None
        self._previous: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle
        self._producing: set[asyncio.Task[None]] = set()  # referenced until done (the loop keeps weak ones)

    async def send(self, records: Iterable[OutRecord], *, urgent: bool = False) -> int:
        """Produce ``records`` with whatever else arrives within the linger (or at once when ``urgent``); returns
        how many were given, once the broker acknowledged them."""
        records = list(records)
        if not records:
            return 0
        if self._linger_s <= 0:
            return await self._producer.send(records)
        self._pending += records
        gathering = self._gathering
        if gathering is None:
            loop = asyncio.get_running_loop()
            gathering = self._gathering = loop.create_future()
            self._timer = loop.call_later(self._linger_s, self._release)
        if urgent:
            self._release()
        await asyncio.shield(gathering)
        return len(records)

    def _release(self) -> None:
        records, done = self._pending, self._gathering
        if done is None:  # released early by an urgent send; this is its timer
            return
        self._pending, self._gathering = [], None
        self._timer.cancel()
        previous, self._previous = self._previous, done
        task = asyncio.ensure_future(self._produce(records, previous, done))
        self._producing.add(task)
        task.add_done_callback(self._producing.discard)

    async def _produce(self, records: list[OutRecord], previous: asyncio.Future[None] | None,
                       done: asyncio.Future[None]) -> None:
        if previous is not None:  # one gathering after another, so a partition's records keep their order
            await asyncio.wait([previous])
        try:
            await self._producer.send(records)
        except BaseException as error:  # every sender of this gathering sees its failure
            done.set_exception(error)
            if not isinstance(error, Exception):
                raise
        else:
            done.set_result(None)
