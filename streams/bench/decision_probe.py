"""Decision latency under load: one admission request at a time through the SDK, timed until its decision is
fetched from the decisions topic.

Every admission request yields exactly one ``admission`` decision (as in :mod:`streams.bench.latency`), so a
probe measures what an agent waiting for an answer sees: the SDK's linger, the broker, the worker's fetch, its
batch and commit order up to the decision's produce, and the way back to a subscriber. Probes ask for a run of
their own in a real tenant (so they share that tenant's partition and batches with its traffic), dated at
``asked_at`` of the workload's clock so they never move the tenant's spend windows. Times are
``time.monotonic()``.

The subscriber reads only the decisions partition the probe run's key maps to (the worker places decisions with
aiokafka's default partitioner), and fetches wait up to 20 ms at the broker: the embedded broker's fetch cost
grows with the batches a partition stores, so a soak's own reader must not add much of the load it measures.
A decision is therefore seen up to 20 ms late.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from types import TracebackType

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import Decision, DecisionKind, Slot
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import CtxflowClient, RunContext
from ctxflow.streams.topics import DECISIONS

__all__ = ["DecisionProbe"]

_PLAN = {Slot.HISTORY: 500, Slot.OUTPUT: 200}


class DecisionProbe:
    """Sends probes with :meth:`send` and collects answers with :meth:`collect` (``async with``)."""

    def __init__(self, settings: Settings, tenant_id: str, user_id: str, model: str, asked_at: datetime) -> None:
        self.settings, self.asked_at = settings, asked_at
        self.ctx = RunContext(tenant_id=tenant_id, user_id=user_id, session_id="soak-probes", agent_id="soak-probe",
                              model=model, run_id=f"soak-probe-{uuid.uuid4().hex[:8]}")
        self._key = f"{tenant_id}:{self.ctx.run_id}".encode()
        self.sent: dict[str, float] = {}  # request id -> when it was queued
        self.answered: dict[str, float] = {}  # request id -> when its decision was fetched
        self._codec = Codec(settings.schema_registry_url, settings.max_content_bytes)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=20)

    async def __aenter__(self) -> DecisionProbe:
        await self._consumer.start()
        partitions = list(range(self.settings.partitions))
        partition = DefaultPartitioner()(self._key, partitions, partitions)
        tp = TopicPartition(self.settings.topic(DECISIONS.name), partition)
        self._consumer.assign([tp])
        await self._consumer.seek_to_end(tp)
        await self._consumer.position(tp)  # resolve "end" now, before the first probe is sent
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._consumer.stop()

    async def send(self, client: CtxflowClient) -> None:
        """Queue one admission request for the probe run."""
        request = self.ctx.admission(_PLAN, at=self.asked_at)
        self.sent[request.request_id] = time.monotonic()
        await client.request_admission(request)

    async def collect(self, timeout_ms: int = 100) -> None:
        """Fetch once and note the first arrival of every probe's decision."""
        batches = await self._consumer.getmany(timeout_ms=timeout_ms)
        arrived = time.monotonic()
        for records in batches.values():
            for record in records:
                if record.key != self._key:
                    continue
                decision = self._codec.decode(record.value, Decision)
                if decision.kind is DecisionKind.ADMISSION and decision.request_id in self.sent:
                    self.answered.setdefault(decision.request_id, arrived)

    def latencies(self, sent_from: float, sent_until: float, now: float) -> tuple[list[float], int, int]:
        """Seconds from send to decision of the probes sent in ``[sent_from, sent_until)``, a probe still
        unanswered counted at its age at ``now`` (a lower bound); with the number of probes and of unanswered."""
        out, unanswered = [], 0
        for rid, at in self.sent.items():
            if sent_from <= at < sent_until:
                answer = self.answered.get(rid)
                unanswered += answer is None
                out.append((now if answer is None else answer) - at)
        return out, len(out), unanswered
