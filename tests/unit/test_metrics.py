"""The worker's metrics count what its batches did, read lag, jobs and sinks when scraped, and keep labels bounded."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from ctxflow.schemas.models import DeadLetter, Decision, DecisionKind, Slot
from ctxflow.streams.runtime.health import PartitionHealth
from ctxflow.streams.runtime.metrics import SinkStatus, WeightedHistogram, WorkerMetrics
from ctxflow.streams.runtime.pipeline import BatchReport
from prometheus_client.parser import text_string_to_metric_families

AT = datetime(2026, 3, 1, tzinfo=UTC)
TOPICS = {"p.turns": "turns", "p.usage": "usage"}


def decision(kind: DecisionKind, n: int = 0, **fields: object) -> Decision:
    return Decision(decision_id=f"{kind}-{n}", tenant_id="acme", run_id=f"run-{n}", kind=kind, reason="r",
                    decided_at=AT, **fields)  # type: ignore[arg-type]


def dead_letter(code: str) -> DeadLetter:
    return DeadLetter(dead_letter_id=f"dl-{code}", source_topic="p.turns", source_partition=0, source_offset=1,
                      reason_code=code, reason="r", failed_at=AT)


def scraped(metrics: WorkerMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}, as Prometheus would read the page."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(metrics.exposition()[0].decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@dataclass
class Batch:
    report: BatchReport
    started: float


def test_a_batch_is_counted_by_topic_kind_action_strategy_and_reason_code() -> None:
    metrics = WorkerMetrics(TOPICS)
    report = BatchReport(
        records=7, topics={"turns": 5, "usage": 2}, decided_s=0.004,
        decisions=[
            decision(DecisionKind.EVICT, 1, strategy="hybrid", tokens_freed=300),
            decision(DecisionKind.EVICT, 2, strategy="hybrid", tokens_freed=200),
            decision(DecisionKind.MASK, 3, strategy="a-tenant-typo", tokens_freed=50),
            decision(DecisionKind.USAGE_RECONCILED, 4),
        ],
        dead_letters=[dead_letter("undecodable"), dead_letter("contract_violation"), dead_letter("undecodable")],
    )
    metrics.count(report)
    metrics.count(BatchReport(records=1, topics={"turns": 1}))
    page = scraped(metrics)
    assert page["ctxflow_events_total"] == {(("topic", "turns"),): 6, (("topic", "usage"),): 2}
    decisions = {labels[0][1]: n for labels, n in page["ctxflow_decisions_total"].items() if n}
    assert decisions == {"evict": 2, "mask": 1, "usage_reconciled": 1}
    assert page["ctxflow_evictions_total"] == {
        (("action", "evict"), ("strategy", "hybrid")): 2,
        (("action", "mask"), ("strategy", "other")): 1,  # not a strategy the planner knows: never a new label
    }
    freed = page["ctxflow_eviction_freed_tokens_total"]
    assert (freed[(("action", "evict"),)], freed[(("action", "mask"),)]) == (500, 50)
    letters = page["ctxflow_dead_letters_total"]
    assert letters[(("reason_code", "undecodable"),)] == 2 and letters[(("reason_code", "contract_violation"),)] == 1
    assert letters[(("reason_code", "processing_error"),)] == 0  # every known code is served from the start


def test_decision_latency_is_observed_once_per_decision_and_batch_time_once_per_batch() -> None:
    metrics = WorkerMetrics(TOPICS)
    three = BatchReport(records=3, topics={"turns": 3}, decided_s=0.004,
                        decisions=[decision(DecisionKind.USAGE_RECONCILED, i) for i in range(3)])
    none = BatchReport(records=2, topics={"usage": 2}, decided_s=0.2)
    metrics.record([Batch(three, started=10.0), Batch(none, started=10.5)], committed_at=10.7)
    page = scraped(metrics)
    latency = page["ctxflow_decision_latency_seconds_bucket"]
    assert page["ctxflow_decision_latency_seconds_count"][()] == 3  # the batch without decisions adds none
    assert page["ctxflow_decision_latency_seconds_sum"][()] == pytest.approx(0.012)
    assert (latency[(("le", "0.0025"),)], latency[(("le", "0.005"),)]) == (0, 3)
    batch = page["ctxflow_batch_seconds_bucket"]
    assert page["ctxflow_batch_seconds_count"][()] == 2
    assert (batch[(("le", "0.1"),)], batch[(("le", "0.25"),)], batch[(("le", "1.0"),)]) == (0, 1, 2)


def test_utilization_is_used_over_cap_by_slot_with_total_for_the_whole_context() -> None:
    metrics = WorkerMetrics(TOPICS)
    metrics.count(BatchReport(decisions=[
        decision(DecisionKind.BUDGET_STATE, 1, slot=Slot.HISTORY, used_tokens=850, cap_tokens=1000),
        decision(DecisionKind.BUDGET_STATE, 2, slot=Slot.HISTORY, used_tokens=1200, cap_tokens=1000),
        decision(DecisionKind.ADMISSION, 3, used_tokens=100, cap_tokens=1000),
        decision(DecisionKind.USAGE_RECONCILED, 4, used_tokens=500),  # no cap: not a utilization
    ]))
    buckets = scraped(metrics)["ctxflow_tenant_utilization_ratio_bucket"]
    history = {dict(labels)["le"]: n for labels, n in buckets.items() if dict(labels)["slot"] == "history"}
    assert (history["0.7"], history["0.85"], history["1.1"], history["1.25"]) == (0, 1, 1, 2)
    assert {slot for (_, slot) in buckets} == {("slot", "history"), ("slot", "total")}


def test_lag_commit_age_and_pending_jobs_are_read_when_scraped() -> None:
    owned = [PartitionHealth("p.turns", 0, 7, 1.5, 0.1, "ok")]
    jobs = [0]
    metrics = WorkerMetrics(TOPICS, partitions=lambda: owned, pending_jobs=lambda: jobs[0])
    assert scraped(metrics)["ctxflow_consumer_lag_records"] == {(("partition", "0"), ("topic", "turns")): 7}
    owned.append(PartitionHealth("p.usage", 3, None, 0.5, None, "ok"))  # no fetch answered yet: lag unknown
    owned.append(PartitionHealth("p.turns-changelog", 0, 9, 0.5, 0.1, "ok"))  # not an input topic
    jobs[0] = 4
    page = scraped(metrics)
    assert page["ctxflow_consumer_lag_records"] == {(("partition", "0"), ("topic", "turns")): 7}
    assert page["ctxflow_consumer_last_commit_age_seconds"] == {
        (("partition", "0"), ("topic", "turns")): 1.5, (("partition", "3"), ("topic", "usage")): 0.5,
    }
    assert page["ctxflow_summarizer_queue_jobs"] == {(): 4}


def test_sink_series_are_absent_until_a_sink_reports_its_status() -> None:
    metrics = WorkerMetrics(TOPICS)
    assert not {name for name in scraped(metrics) if name.startswith("ctxflow_sink_")}
    statuses = [SinkStatus("clickhouse", rows_written=120, retries=2, lag_records=30, healthy=False)]
    metrics.watch_sinks(lambda: statuses)
    page = scraped(metrics)
    sink = (("sink", "clickhouse"),)
    assert (page["ctxflow_sink_rows_total"][sink], page["ctxflow_sink_retries_total"][sink]) == (120, 2)
    assert (page["ctxflow_sink_lag_records"][sink], page["ctxflow_sink_healthy"][sink]) == (30, 0)


def test_two_workers_in_one_process_keep_their_own_counts() -> None:
    first, second = WorkerMetrics(TOPICS), WorkerMetrics(TOPICS)  # the global registry would refuse the second
    first.count(BatchReport(records=3, topics={"turns": 3}))
    assert scraped(first)["ctxflow_events_total"][(("topic", "turns"),)] == 3
    assert scraped(second)["ctxflow_events_total"][(("topic", "turns"),)] == 0
    assert "process_cpu_seconds_total" in scraped(first)


def test_the_scraper_may_ask_for_openmetrics() -> None:
    body, content_type = WorkerMetrics(TOPICS).exposition("application/openmetrics-text;version=1.0.0,*/*;q=0.1")
    assert content_type.startswith("application/openmetrics-text;")
    assert body.endswith(b"# EOF\n")


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    histogram = WeightedHistogram((0.5, 1.0))
    histogram.observe(0.5, count=3)
    histogram.observe(2.0)
    assert histogram.cumulative() == [("0.5", 3.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert histogram.sum == 3.5
