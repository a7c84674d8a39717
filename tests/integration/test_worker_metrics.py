"""A worker's ``/metrics`` counts what it was sent, ``promtool`` accepts the exposition, and a real Prometheus
server scrapes it.

One worker serves the module: SDK traffic (manifests, then a workload with eviction pressure) and one record
that does not decode are published once, and the tests read the worker's page as an operator's tools would.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from ctxflow.schemas.models import Decision, DecisionKind, Slot
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.runtime.health import PartitionHealth
from ctxflow.streams.runtime.metrics import METRICS, SinkStatus, WorkerMetrics
from ctxflow.streams.runtime.pipeline import BatchReport
from ctxflow.streams.sdk import TOPIC_OF
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.worker_process import INPUT_TOPICS, WorkerProcess
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.support_deploy import fresh_settings
from tests.support_kafka import decisions_on_topic, read_topics, wait_until
from tests.support_prometheus import PrometheusServer, promtool_check_metrics
from tests.support_traffic import publish, send_raw

EVICTION_KINDS = {"evict", "mask", "compress", "swap", "offload", "recall"}


@dataclass
class Served:
    settings: Settings
    worker: WorkerProcess
    sent: Counter[str]  # records per logical input topic


@pytest.fixture(scope="module")
def served(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = fresh_settings(stack, tmp_path_factory.mktemp("metrics") / "home")
    workload = Workload(5, tenants=3, sessions_per_tenant=2, max_events=1_500, eviction=True)
    records = [*workload.manifests(), *workload.events()]
    with WorkerProcess(settings) as worker:
        publish(settings, records)
        send_raw(settings, [("turns", b"acme", b"not an avro record")])
        worker.wait_caught_up()
        # Memory candidates go to the memory gate, not to this worker.
        sent = Counter(topic for record in records if (topic := TOPIC_OF[type(record)].name) in INPUT_TOPICS)
        sent["turns"] += 1
        # The worker also reads back the invalidations it wrote (supersessions among the workload's memories).
        sent["invalidations"] = len(asyncio.run(read_topics(settings, ["invalidations"])))
        sent = +sent  # a topic that got nothing is not counted
        yield Served(settings, worker, sent)


def scrape(port: int) -> tuple[str, str]:
    """The worker's ``/metrics`` page as Prometheus' text format, and its content type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode(), response.headers["Content-Type"]


def samples(text: str, name: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def by_label(text: str, name: str, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in samples(text, name)}


def test_metrics_count_the_records_and_decisions_the_worker_was_sent(served: Served) -> None:
    text, content_type = scrape(served.settings.web_port)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"

    events = {topic: n for topic, n in by_label(text, "ctxflow_events_total", "topic").items() if n}
    assert events == dict(served.sent)
    assert by_label(text, "ctxflow_dead_letters_total", "reason_code")["undecodable"] == 1

    published = Counter(d.kind.value for d in decisions_on_topic(served.settings))
    counted = {kind: n for kind, n in by_label(text, "ctxflow_decisions_total", "kind").items() if n}
    assert counted == dict(published)
    evictions = sum(s.value for s in samples(text, "ctxflow_evictions_total"))
    assert evictions == sum(n for kind, n in published.items() if kind in EVICTION_KINDS) > 0

    latency = samples(text, "ctxflow_decision_latency_seconds_count")[0].value
    assert latency == sum(published.values())
    jobs = asyncio.run(read_topics(served.settings, ["compression.jobs"]))
    assert samples(text, "ctxflow_compression_jobs_total")[0].value == len(jobs)
    # No summarizer runs here: every job is still awaited, unless its run gave up on it.
    assert 0 <= samples(text, "ctxflow_summarizer_queue_jobs")[0].value <= len(jobs)
    assert samples(text, "ctxflow_batch_seconds_count")[0].value >= 1

    # Lag as of the worker's last fetch: zero on every owned partition once its commits caught up.
    def lags() -> dict[tuple[str, str], float]:
        return {(s.labels["topic"], s.labels["partition"]): s.value
                for s in samples(scrape(served.settings.web_port)[0], "ctxflow_consumer_lag_records")}

    settled = wait_until(lags, lambda seen: len(seen) == len(INPUT_TOPICS) * served.settings.partitions
                         and not any(seen.values()), 30, "zero lag on every input partition")
    assert {topic for topic, _ in settled} == set(INPUT_TOPICS)


def test_promtool_accepts_the_worker_exposition(served: Served) -> None:
    text, _ = scrape(served.settings.web_port)
    checked = promtool_check_metrics(text.encode())
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_accepts_every_metric_with_samples() -> None:
    """Every family populated, sinks included (the live worker has no sink status yet)."""
    metrics = WorkerMetrics(
        {"p.turns": "turns"},
        partitions=lambda: [PartitionHealth("p.turns", 0, 4, 2.5, 0.1, "ok")],
        pending_jobs=lambda: 1,
    )
    metrics.watch_sinks(lambda: [SinkStatus("clickhouse", rows_written=10, retries=1, lag_records=3, healthy=True)])
    at = datetime.now(UTC)
    decisions = [
        Decision(decision_id="d1", tenant_id="acme", kind=DecisionKind.EVICT, reason="relief", decided_at=at,
                 strategy="hybrid", tokens_freed=40, slot=Slot.HISTORY, used_tokens=90, cap_tokens=100),
        Decision(decision_id="d2", tenant_id="acme", kind=DecisionKind.BUDGET_STATE, reason="soft",
                 decided_at=at, used_tokens=900, cap_tokens=1000),
    ]
    metrics.count(BatchReport(records=2, topics={"turns": 2}, decisions=decisions, decided_s=0.01))
    body, _ = metrics.exposition()
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {spec.name.removesuffix("_total") for spec in METRICS} <= names
    checked = promtool_check_metrics(body)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_prometheus_server_scrapes_the_worker(served: Served, tmp_path_factory: pytest.TempPathFactory) -> None:
    target = f"127.0.0.1:{served.settings.web_port}"
    with PrometheusServer(tmp_path_factory.mktemp("prometheus"), [target]) as prometheus:
        up = wait_until(prometheus.targets, lambda ts: [t["health"] for t in ts] == ["up"], 30,
                        "the worker's target up")
        assert up[0]["labels"]["instance"] == target, up
        sent = sum(served.sent.values())
        seen = wait_until(lambda: prometheus.query("sum(ctxflow_events_total)"),
                          lambda result: list(result.values()) == [sent], 30, f"{sent} events in Prometheus")
        assert seen
        by_topic = prometheus.query("sum by (topic) (ctxflow_events_total) > 0")
        assert {key: value for key, value in by_topic.items()} == {
            f'{{"topic": "{topic}"}}': float(n) for topic, n in served.sent.items()
        }
