"""The worker's Prometheus metrics: what it decided, how fast, and how far behind it is (``GET /metrics``).

Every metric is defined here, in :data:`METRICS`, with its help text; ``docs/operations-metrics.md`` lists them for
operators. Names follow Prometheus conventions (``ctxflow_`` prefix, base units, ``_total`` for counters,
``_seconds``, ``_ratio``) and every label has a closed set of values: logical topic, partition number, decision
kind, eviction action and strategy, dead-letter reason code, slot, sink name. Never a tenant, user or run.

Cost: the worker calls :meth:`WorkerMetrics.record` once per committed group with the group's batches, which adds
each :class:`~streams.runtime.pipeline.BatchReport`'s per-topic counts and walks its decisions and dead letters (no
per-record work here: the pipeline counts a batch's records per topic as it takes them, ~0.06 us a record; the whole
update measured ~3 us a batch plus ~0.85 us a decision, see ``docs/operations-metrics.md``). Everything else,
consumer lag, pending compression jobs and sink progress, is read from the worker's own state when Prometheus
scrapes (:class:`_Collector`), never on the hot path. All of it runs on the worker's event loop (the web server
shares it), so a scrape sees whole batches and no lock is needed.

Each :class:`WorkerMetrics` has a :class:`~prometheus_client.CollectorRegistry` of its own, not the library's
global one, so several workers in one process (tests) never collide.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from ctxflow.processors.eviction.planner import EVICTION_KINDS
from ctxflow.schemas.contract import ReasonCode
from ctxflow.schemas.models import CompressionJob, DecisionKind, EvictionStrategy, MemoryVerdict, Slot
from ctxflow.streams.runtime.health import PartitionHealth
from ctxflow.streams.runtime.pipeline import BatchReport
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

MetricType = Literal["counter", "gauge", "histogram"]


class DecidedBatch(Protocol):
    """What :meth:`WorkerMetrics.record` reads of a batch (a :class:`~streams.runtime.pipeline.PreparedBatch`)."""

    @property
    def report(self) -> BatchReport: ...

    @property
    def started(self) -> float:
        """``time.perf_counter()`` when the worker took the batch's records."""
        ...


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: name (a counter's with ``_total``), type, help text and label names."""

    name: str
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()

    def family(self) -> Metric:
        """An empty family of this metric, to add samples to."""
        kind = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
        return kind[self.type](self.name, self.help, labels=self.labels)


def _spec(name: str, type_: MetricType, help_: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, type_, help_, labels)


EVENTS = _spec("ctxflow_events_total", "counter", "Input records the worker processed and committed (their effects "
               "durable), by logical input topic; dead-lettered records included.", "topic")
DECISIONS = _spec("ctxflow_decisions_total", "counter", "Decisions the worker published, by kind.", "kind")
EVICTIONS = _spec("ctxflow_evictions_total", "counter", "Eviction planner decisions, by action (evict, mask, "
                  "compress, swap, offload, recall) and the strategy that chose the items.", "action", "strategy")
FREED = _spec("ctxflow_eviction_freed_tokens_total", "counter", "Working-set tokens freed by eviction planner "
              "decisions, by action.", "action")
DEAD_LETTERS = _spec("ctxflow_dead_letters_total", "counter", "Input records the worker refused and wrote to the "
                     "dead-letter topic, by reason code.", "reason_code")
JOBS = _spec("ctxflow_compression_jobs_total", "counter", "Compression jobs the eviction planner asked the "
             "summarizers for.")
VERDICTS = _spec("ctxflow_memory_verdicts_total", "counter", "Memory gate verdicts on candidates, by outcome "
                 "(accepted, merged, rejected) and rule.", "outcome", "rule")
LATENCY = _spec("ctxflow_decision_latency_seconds", "histogram", "Per decision: seconds from the worker taking the "
                "batch that holds its record from the intake to handing the batch's decisions to the decision "
                "outlet (which sends within CTXFLOW_DECISION_LINGER_MS); time in Kafka before is not included.")
UTILIZATION = _spec("ctxflow_tenant_utilization_ratio", "histogram", "Used tokens over cap of every decision that "
                    "carries both (budget state changes, admissions, eviction requests and eviction actions), by "
                    "slot (total: the whole context window).", "slot")
BATCH = _spec("ctxflow_batch_seconds", "histogram", "Per batch: seconds from the worker taking its records from "
              "the intake to their effects being durable (decisions, Redis, ClickHouse, changelogs), after which "
              "their offsets may commit.")
LAG = _spec("ctxflow_consumer_lag_records", "gauge", "Input records on the broker that the worker has not "
            "committed yet, per logical input topic and partition it owns (as of its last fetch).",
            "topic", "partition")
COMMIT_AGE = _spec("ctxflow_consumer_last_commit_age_seconds", "gauge", "Seconds since the committed offset of an "
                   "owned input partition last advanced (or it was assigned).", "topic", "partition")
QUEUE = _spec("ctxflow_summarizer_queue_jobs", "gauge", "Compression jobs this worker's planner asked for and still "
              "waits on (no summary consumed, not given up), over the runs of the partitions it owns.")
SINK_ROWS = _spec("ctxflow_sink_rows_total", "counter", "Rows a sink wrote durably since it started.", "sink")
SINK_RETRIES = _spec("ctxflow_sink_retries_total", "counter", "Writes a sink retried since it started.", "sink")
SINK_LAG = _spec("ctxflow_sink_lag_records", "gauge", "Records handed to a sink and not yet durable in it.", "sink")
SINK_HEALTHY = _spec("ctxflow_sink_healthy", "gauge", "1 while a sink writes successfully, 0 while it fails.", "sink")

#: Every ctxflow metric the worker serves (the client library adds process_* and python_* ones).
METRICS: tuple[MetricSpec, ...] = (
    EVENTS, DECISIONS, EVICTIONS, FREED, DEAD_LETTERS, JOBS, VERDICTS, LATENCY, UTILIZATION, BATCH, LAG,
    COMMIT_AGE, QUEUE, SINK_ROWS, SINK_RETRIES, SINK_LAG, SINK_HEALTHY,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Around the soft watermark (0.85 by default) and the cap; above 1 a slot is over its cap.
UTILIZATION_BUCKETS = (0.1, 0.25, 0.5, 0.7, 0.85, 0.9, 0.95, 1.0, 1.1, 1.25, 1.5, 2.0)

_STRATEGIES = frozenset(EvictionStrategy)
_REASON_CODES = get_args(ReasonCode)


@dataclass(frozen=True, slots=True)
class SinkStatus:
    """One sink's progress, as a sink reports it to :meth:`WorkerMetrics.watch_sinks` (read at scrape time).

    ``sink`` is the sink's fixed name (``clickhouse``, ``redis``): a label value, never per tenant or run.
    ``rows_written`` and ``retries`` count since the sink started and never decrease; ``lag_records`` is what was
    handed to it and is not durable yet.
    """

    sink: str
    rows_written: int
    retries: int
    lag_records: int
    healthy: bool


class WeightedHistogram:
    """Bucket counts and sum of observations, each standing for ``count`` events: a batch's decisions share one
    latency, observed once. Buckets follow Prometheus (a value counts in every bucket whose bound is >= it)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, events at or below it)`` per bucket, ``+Inf`` last: the exposition's form."""
        out, total = [], 0
        for bound, count in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class WorkerMetrics:
    """One worker's metrics: a private registry, :meth:`record` for committed batches, readers for the rest.

    ``input_topics`` maps full input topic names to their logical names (the ``topic`` label). ``partitions``
    returns the owned input partitions' health (lag, commit age); ``pending_jobs`` the planner's unanswered
    compression jobs. Sink series are absent until a sink registers with :meth:`watch_sinks`.
    """

    def __init__(
        self,
        input_topics: Mapping[str, str],
        *,
        partitions: Callable[[], Iterable[PartitionHealth]] = tuple,
        pending_jobs: Callable[[], int] = lambda: 0,
    ) -> None:
        self.registry = CollectorRegistry()
        self._topics = dict(input_topics)
        self._partitions, self._pending_jobs = partitions, pending_jobs
        self._sinks: Callable[[], Iterable[SinkStatus]] = tuple
        # Known label values start at zero, so a rate over their first increment is not lost.
        self.events: dict[str, int] = dict.fromkeys(self._topics.values(), 0)
        self.decisions: dict[DecisionKind, int] = dict.fromkeys(DecisionKind, 0)
        self.evictions: dict[tuple[DecisionKind, str], int] = {}
        self.freed: dict[DecisionKind, int] = dict.fromkeys(sorted(EVICTION_KINDS), 0)
        self.dead_letters: dict[str, int] = dict.fromkeys(_REASON_CODES, 0)
        self.jobs = 0
        self.verdicts: dict[tuple[str, str], int] = {}
        self.latency = WeightedHistogram(LATENCY_BUCKETS)
        self.batch = WeightedHistogram(BATCH_BUCKETS)
        self.utilization: dict[Slot | None, WeightedHistogram] = {}
        self.registry.register(_Collector(self))
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)

    def watch_sinks(self, statuses: Callable[[], Iterable[SinkStatus]]) -> None:
        """Serve the ``ctxflow_sink_*`` series from ``statuses``, called at every scrape."""
        self._sinks = statuses

    def record(self, batches: Sequence[DecidedBatch], committed_at: float | None = None) -> None:
        """Count a group of batches whose effects became durable at ``committed_at`` (``time.perf_counter()``,
        default now)."""
        done = time.perf_counter() if committed_at is None else committed_at
        for batch in batches:
            self.count(batch.report)
            self.batch.observe(done - batch.started)

    def count(self, report: BatchReport) -> None:
        """Add one batch's records, decisions, dead letters and jobs."""
        events = self.events
        for topic, records in report.topics.items():
            events[topic] = events.get(topic, 0) + records
        for letter in report.dead_letters:
            code = letter.reason_code if letter.reason_code in self.dead_letters else "other"
            self.dead_letters[code] = self.dead_letters.get(code, 0) + 1
        verdicts = self.verdicts
        for record in report.published:
            if isinstance(record, CompressionJob):
                self.jobs += 1
            elif isinstance(record, MemoryVerdict):
                # Rules are a closed set of the gate's (processors.memory.gate.Rule): bounded labels.
                label = (record.outcome.value, record.rule)
                verdicts[label] = verdicts.get(label, 0) + 1
        if report.decisions:
            self.latency.observe(report.decided_s, len(report.decisions))
        decisions, evictions, freed, utilization = self.decisions, self.evictions, self.freed, self.utilization
        for decision in report.decisions:
            kind = decision.kind
            decisions[kind] += 1
            if kind in EVICTION_KINDS:
                strategy = decision.strategy if decision.strategy in _STRATEGIES else "other"
                evictions[kind, strategy] = evictions.get((kind, strategy), 0) + 1  # type: ignore[index]
                freed[kind] += decision.tokens_freed or 0
            if decision.cap_tokens and decision.used_tokens is not None:
                histogram = utilization.get(decision.slot)
                if histogram is None:
                    histogram = utilization[decision.slot] = WeightedHistogram(UTILIZATION_BUCKETS)
                histogram.observe(decision.used_tokens / decision.cap_tokens)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the format the ``Accept`` header asks for (Prometheus text 0.0.4 by default, or
        OpenMetrics), and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class _Collector:
    """Renders a :class:`WorkerMetrics` at scrape time, reading lag, pending jobs and sinks then."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._m = metrics

    def describe(self) -> Iterator[Metric]:
        # Names only (the registry checks them for duplicates); collect() would read the worker's state.
        return (spec.family() for spec in METRICS)

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield _filled(EVENTS, [((topic,), n) for topic, n in m.events.items()])
        yield _filled(DECISIONS, [((kind.value,), n) for kind, n in m.decisions.items()])
        yield _filled(EVICTIONS, [((kind.value, strategy), n) for (kind, strategy), n in m.evictions.items()])
        yield _filled(FREED, [((kind.value,), n) for kind, n in m.freed.items()])
        yield _filled(DEAD_LETTERS, [((code,), n) for code, n in m.dead_letters.items()])
        yield _filled(JOBS, [((), m.jobs)])
        yield _filled(VERDICTS, list(m.verdicts.items()))
        yield _histogram(LATENCY, [((), m.latency)])
        yield _histogram(UTILIZATION, [((slot.value if slot else "total",), h) for slot, h in m.utilization.items()])
        yield _histogram(BATCH, [((), m.batch)])
        lag, age = LAG.family(), COMMIT_AGE.family()
        for p in m._partitions():
            topic = m._topics.get(p.topic)
            if topic is None:
                continue
            labels = [topic, str(p.partition)]
            if p.lag is not None:  # unknown until the partition's first fetch response
                lag.add_metric(labels, p.lag)
            age.add_metric(labels, p.last_commit_age_s)
        yield lag
        yield age
        yield _filled(QUEUE, [((), m._pending_jobs())])
        sinks = list(m._sinks())
        yield _filled(SINK_ROWS, [((s.sink,), s.rows_written) for s in sinks])
        yield _filled(SINK_RETRIES, [((s.sink,), s.retries) for s in sinks])
        yield _filled(SINK_LAG, [((s.sink,), s.lag_records) for s in sinks])
        yield _filled(SINK_HEALTHY, [((s.sink,), int(s.healthy)) for s in sinks])


def _filled(spec: MetricSpec, samples: Iterable[tuple[Sequence[str], float]]) -> Metric:
    """A counter or gauge family with ``(label values, value)`` samples."""
    family = spec.family()
    for labels, value in samples:
        family.add_metric(labels, value)  # type: ignore[attr-defined]
    return family



def _histogram(spec: MetricSpec, samples: Iterable[tuple[Sequence[str], WeightedHistogram]]) -> Metric:
    family = spec.family()
    for labels, histogram in samples:
        family.add_metric(labels, histogram.cumulative(), histogram.sum)  # type: ignore[attr-defined]
    return family
