"""``ctxflow bench`` end to end at its smallest size: every phase runs against its own embedded stack and
reports figures a reader can trust (every probe answered, the latency rate the one asked for)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from ctxflow.streams.bench import BenchConfig, run_bench
from ctxflow.streams.bench.corpus import TurnCorpus, publish
from ctxflow.streams.bench.load import LoadFailed, LoadPlan, generate_load
from ctxflow.streams.bench.sink import measure_sink
from ctxflow.streams.config import Settings
from ctxflow.streams.sink.catalogue import PROJECTED
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_kafka import read_topics, wait_processed


@pytest.mark.timeout(300)
def test_smoke_bench_runs_every_phase_and_answers_every_probe(tmp_path: Path) -> None:
    said: list[str] = []
    # A deployment of 4 partitions (the default is 1), so the comparison phase runs too.
    results = run_bench(Settings(partitions=4), BenchConfig.smoke(), said.append)
    results.write(tmp_path / "bench-results.json")
    written = json.loads((tmp_path / "bench-results.json").read_text())

    assert written["pipeline_eps"] > 0 and written["raw_ceiling_eps"] > 0
    assert written["ratio"] == pytest.approx(written["pipeline_eps"] / written["raw_ceiling_eps"], abs=0.001)
    # The latency phases ran at the rates they were given (half and a quarter of the pipeline rate), every
    # probe got its decision, and the load came from its own process at the benchmark's partition count.
    assert written["latency_rate_eps"] == pytest.approx(written["pipeline_eps"] / 2, rel=0.15)
    assert written["quarter_rate_eps"] == pytest.approx(written["pipeline_eps"] / 4, rel=0.15)
    assert written["latency_missing"] == 0 and written["latency_samples"] > 0
    assert 0 < written["p50_latency_ms"] <= written["p99_latency_ms"] <= written["max_latency_ms"]
    assert written["partitions"] == 1
    # The deployment's own partition count is measured too, for comparison.
    assert written["compared_partitions"] == 4
    assert written["compared_partitions_p99_latency_ms"] > 0
    assert written["sessions_runs"] == 1_000 and written["recovery_s"] > 0
    # The sink alone wrote every turn of the corpus (and the worker's decisions besides).
    assert written["sink_rows"] >= 2_000 and written["sink_rows_per_s"] > 0 and written["sink_rows_per_cpu_s"] > 0
    assert any("records sent at" in line for line in said), "the load generator's progress reaches the caller"


def test_a_failing_load_generator_stops_the_phase_with_its_reason(stack: EmbeddedStack) -> None:
    # Topics that were never created: the SDK in the child process refuses to send, and the parent says why.
    settings = stack.settings.model_copy(update={"topic_prefix": f"missing-{uuid.uuid4().hex[:8]}"})
    corpus = TurnCorpus()
    turns = corpus.take(40)
    plan = LoadPlan(settings, turns, {19: corpus.last[19]}, rate_eps=1_000)
    with pytest.raises(LoadFailed, match="does not exist on the broker"):
        asyncio.run(generate_load(plan, lambda _: None))


def test_the_sink_phase_drains_every_projected_record(settings: Settings) -> None:
    corpus = TurnCorpus()
    turns = corpus.manifests() + corpus.take(3_000)
    asyncio.run(publish(settings, turns))
    # The sink writes input records as the workers decided them: a worker (without a sink) decides first.
    with WorkerProcess(settings.model_copy(update={"sink": "off"})):
        wait_processed(settings, sink=False)
    projected = asyncio.run(read_topics(settings, [spec.name for spec in PROJECTED]))
    assert sum(r.topic == settings.topic("turns") for r in projected) == 3_000 < len(projected)  # decisions, costs
    said: list[str] = []
    run = measure_sink(settings, said.append)
    assert (run.rows, run.skipped) == (len(projected), 0)  # every projected record once, nothing else
    assert run.flushes >= 1 and run.rows_per_s > 0 and run.rows_per_cpu_s > 0
    assert "rows per CPU second" in said[-1]
