"""Latency phase: produce at a steady rate and time each admission from send to its decision on the topic.

Every admission request yields exactly one ``admission`` decision, so interleaving one every ``every`` turns
gives a steady stream of probes through the same batches as the turns around them. The turns and probes are
sent from a process of their own at low CPU priority, standing for agents on other machines
(:mod:`streams.bench.load`). A probe's latency runs from just before the SDK queues the request to the moment
this process's consumer fetched the decision (both on the machine's monotonic clock). It includes the SDK's
linger, the broker, the worker's fetch wait, its batch and the commit order up to the decision's produce, and
the decision's way back to a subscriber.

The same consumer also fetches the probes themselves from the admissions topic: send -> fetched is what the
broker alone costs (one produce and one fetch hop, with no worker in between), measured on the same probes at
the same time. A decision makes two such hops (request in, decision out), so twice the broker's figure is the
floor under the end-to-end one on this machine.

Both are also reported per half of the window (probes sent in its first and its second half): at a steady
rate they should match. The embedded broker's memory storage lists every stored batch of a partition on each
fetch, so its hop gets slower as the topics fill during the window; a second half worse than the first, in the
broker's hop as much as end to end, shows that growth rather than a change in ctxflow's own cost.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import AdmissionRequest, Decision, DecisionKind, TurnEvent
from ctxflow.streams.bench.corpus import Encoded
from ctxflow.streams.bench.load import LoadPlan, generate_load
from ctxflow.streams.config import Settings


@dataclass(frozen=True, slots=True)
class Sample:
    """One probe's duration (seconds) and when it was sent (``time.perf_counter()``)."""

    sent_at: float
    seconds: float


@dataclass(frozen=True, slots=True)
class LatencyResult:
    """Percentiles of produce -> decision available, over ``samples`` admissions at ``rate_eps``; and of
    produce -> the probe itself fetched from the broker (``broker_*``, no worker involved)."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    samples: int
    missing: int
    rate_eps: float
    broker_p50_ms: float
    broker_p99_ms: float
    #: p99 of the probes sent in the first and in the second half of the window, end to end and broker alone.
    p99_halves_ms: tuple[float, float]
    broker_p99_halves_ms: tuple[float, float]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0-100) of already sorted values."""
    if not sorted_values:
        return float("nan")
    # ceil, not round(x + 0.5): Python rounds halves to even, which made the p99 of 100 values the maximum.
    rank = max(1, min(len(sorted_values), math.ceil(q * len(sorted_values) / 100)))
    return sorted_values[rank - 1]


def _p99_halves(samples: Sequence[Sample], middle: float) -> tuple[float, float]:
    first = sorted(s.seconds for s in samples if s.sent_at < middle)
    second = sorted(s.seconds for s in samples if s.sent_at >= middle)
    return percentile(first, 99) * 1000, percentile(second, 99) * 1000


async def measure_latency(
    settings: Settings, turns: Sequence[Encoded], models: Sequence[TurnEvent], rate_eps: float, every: int,
    say: Callable[[str], None],
) -> LatencyResult:
    """Send ``turns`` at ``rate_eps`` with an admission for the current turn's run after every ``every``-th.

    The load comes from a process of its own (:mod:`streams.bench.load`); this process subscribes.
    """
    codec = Codec(settings.schema_registry_url, settings.max_content_bytes)
    answered: dict[str, float] = {}  # probe request id -> when its decision was fetched
    fetched: dict[str, float] = {}  # probe request id -> when the probe itself was fetched
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic(topic), p)
               for topic in ("decisions", "admissions") for p in range(settings.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)  # resolve "end" now, before the first probe is sent
        done = asyncio.Event()
        reader = asyncio.create_task(_read_arrivals(consumer, codec, settings.topic("admissions"), answered,
                                                    fetched, done))
        probes = {index: models[index] for index in range(every - 1, len(turns), every)}
        try:
            load = await generate_load(LoadPlan(settings, turns, probes, rate_eps), say)
            deadline = time.perf_counter() + 30
            while not load.sent.keys() <= answered.keys() and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
        finally:
            done.set()
            await reader
    finally:
        await consumer.stop()
    sent = load.sent
    latencies = [Sample(at, answered[rid] - at) for rid, at in sent.items() if rid in answered]
    hops = [Sample(at, fetched[rid] - at) for rid, at in sent.items() if rid in fetched]
    middle = (min(sent.values()) + max(sent.values())) / 2 if sent else 0.0
    total, hop = sorted(s.seconds for s in latencies), sorted(s.seconds for s in hops)
    return LatencyResult(
        p50_ms=percentile(total, 50) * 1000, p99_ms=percentile(total, 99) * 1000,
        max_ms=(total[-1] if total else float("nan")) * 1000, samples=len(total),
        missing=len(sent) - len(total), rate_eps=load.rate_eps,
        broker_p50_ms=percentile(hop, 50) * 1000, broker_p99_ms=percentile(hop, 99) * 1000,
        p99_halves_ms=_p99_halves(latencies, middle), broker_p99_halves_ms=_p99_halves(hops, middle),
    )


async def _read_arrivals(
    consumer: AIOKafkaConsumer, codec: Codec, admissions: str, answered: dict[str, float], fetched: dict[str, float],
    done: asyncio.Event,
) -> None:
    # First arrivals only: a decision fetched twice (a replay re-publishes it) is one answer.
    while not done.is_set():
        batches = await consumer.getmany(timeout_ms=20)
        arrived = time.perf_counter()
        for tp, records in batches.items():
            for record in records:
                if tp.topic == admissions:
                    fetched.setdefault(codec.decode(record.value, AdmissionRequest).request_id, arrived)
                    continue
                decision = codec.decode(record.value, Decision)
                if decision.kind is DecisionKind.ADMISSION and decision.request_id is not None:
                    answered.setdefault(decision.request_id, arrived)
