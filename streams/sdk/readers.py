"""Reading topics from the SDK: a positioned group-less reader, and one tenant's decisions as a stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer
from ctxflow.schemas.codec import RejectedRecord
from ctxflow.schemas.models import Decision
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.sdk.run_context import in_session
from ctxflow.streams.topics import DECISIONS

if TYPE_CHECKING:
    from ctxflow.streams.sdk.client import CtxflowClient

log = logging.getLogger(__name__)


class TopicReader:
    """A group-less consumer over every partition of one topic, positioned when entered."""

    def __init__(self, client: CtxflowClient, topic: str, from_beginning: bool) -> None:
        self._client, self._topic, self._from_beginning = client, topic, from_beginning
        self.consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> TopicReader:
        self.partitions = await self._client.partitions(self._topic)
        # The deployment's fetch wait, as the worker's (25 ms unless set): the embedded broker holds every fetch
        # for the whole wait, so aiokafka's default of 500 ms made each decision reach a subscriber up to 0.5 s late.
        consumer = AIOKafkaConsumer(bootstrap_servers=self._client.bootstrap, group_id=None,
                                    enable_auto_commit=False, client_id="ctxflow-sdk-reader",
                                    fetch_max_wait_ms=self._client.settings.fetch_max_wait_ms)
        await consumer.start()
        self.consumer = consumer
        try:
            if self._from_beginning:
                consumer.assign(self.partitions)
                await consumer.seek_to_beginning(*self.partitions)
            else:  # not seek_to_end: the reported end can fall inside the last batch (see streams.runtime.log_end)
                await log_end_offsets(consumer, self.partitions)
            for tp in self.partitions:  # resolve offsets now, so records published after entry are never skipped
                await consumer.position(tp)
        except BaseException:  # a failed or cancelled entry gets no __aexit__: close the consumer here
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    async def until_end(self, timeout_s: float) -> list[Any]:
        """Every record up to the end offsets as of this call; raises ``TimeoutError`` past ``timeout_s``."""
        assert self.consumer is not None
        consumer, found = self.consumer, []
        async with asyncio.timeout(timeout_s):
            start = {tp: await consumer.position(tp) for tp in self.partitions}
            ends = await log_end_offsets(consumer, self.partitions)  # moves the consumer to the ends: come back
            for tp, offset in start.items():
                consumer.seek(tp, offset)
            while [tp for tp in self.partitions if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(records)
        return found


class DecisionStream:
    """Decisions for one tenant, optionally narrowed to a session or run, decoded and in partition order.

    A session includes its sub-agents' sessions (``<session>/<child run>``, :func:`~.run_context.child_session`):
    a workflow's decisions arrive together whichever of its runs they are for.

    ``async with`` pins the start offsets on entry, so no decision published after entry is missed; bare
    ``async for`` starts lazily. Other tenants' records are skipped by key before decoding; undecodable
    records are logged and skipped.
    """

    def __init__(self, client: CtxflowClient, tenant_id: str, session_id: str | None, run_id: str | None,
                 from_beginning: bool) -> None:
        self._client, self._tenant_id = client, tenant_id
        self._session_id, self._run_id = session_id, run_id
        self._reader = TopicReader(client, client.topic(DECISIONS), from_beginning)
        self._entered = False

    async def __aenter__(self) -> DecisionStream:
        await self._reader.__aenter__()
        self._entered = True
        return self

    async def __aexit__(self, *_: object) -> None:
        self._entered = False
        await self._reader.__aexit__()

    def __aiter__(self) -> AsyncIterator[Decision]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Decision]:
        owned = not self._entered
        if owned:
            await self.__aenter__()
        prefix = f"{self._tenant_id}:".encode()
        try:
            while self._reader.consumer is not None:
                batches = await self._reader.consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        if record.key is not None and not record.key.startswith(prefix):
                            continue
                        decision = self._decode(record)
                        if decision is not None and self._wanted(decision):
                            yield decision
        finally:
            if owned:
                await self.__aexit__()

    def _decode(self, record: Any) -> Decision | None:
        try:
            return self._client.codec.decode(record.value, Decision)
        except RejectedRecord as exc:
            log.warning("skipping undecodable decision at %s[%s]@%s: %s",
                        record.topic, record.partition, record.offset, exc)
            return None

    def _wanted(self, decision: Decision) -> bool:
        return (decision.tenant_id == self._tenant_id
                and (self._session_id is None or in_session(decision.session_id, self._session_id))
                and self._run_id in (None, decision.run_id))
