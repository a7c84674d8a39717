"""One benchmark run: its own embedded stack on free ports, every phase in order, one results object.

Phases (all in the same run, so their figures are comparable): corpus (encoded before any clock starts) ->
(a) raw decode ceiling -> (b) worker end to end over the same records -> (b') the ClickHouse sink alone over the
same topics, the decisions of (b) among them (``streams.bench.sink``) -> (c) latency at half of (b)'s rate
(the target), at half of it again on the deployment's partition count when that differs, and at a quarter of
it, each with a fresh worker and topics -> (d) session memory and SIGKILL recovery with
``runs_for_memory`` active runs, fresh worker -> (d') ``retired_runs`` finished runs spread over hundreds of
retention windows: RSS and restart time against the same worker empty (``streams.bench.retention``) -> (e) the
budget core alone, in process -> (e') the eviction planner's table, its CPU per eviction decision and the
summarizer, in process (``streams.bench.eviction``) -> (e'') the memory gate with secret and PII detection on, in
process (``streams.bench.memory_gate``) -> (e''') recall over the retrieval index, in a process of its own (chDB
admits one data directory per process) (``streams.bench.recall``).

The benchmark's deployment is one worker process, so its topics have one partition each
(``BenchConfig.partitions``): that worker reads every partition anyway, and the embedded broker's fetch costs
CPU per partition that holds new records, in proportion to the batches that partition stores (see README).
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxflow.streams.bench.core import measure_core
from ctxflow.streams.bench.corpus import TurnCorpus, publish
from ctxflow.streams.bench.eviction import GOAL_BYTES_PER_ITEM, ITEMS_PER_RUN, measure_eviction
from ctxflow.streams.bench.latency import LatencyResult, measure_latency
from ctxflow.streams.bench.memory_gate import GOAL_CANDIDATES_PER_CPU_S
from ctxflow.streams.bench.memory_gate import measure as measure_memory_gate
from ctxflow.streams.bench.report import BenchResults, cpu_probe_ms, git_sha, machine
from ctxflow.streams.bench.retention import measure_retention
from ctxflow.streams.bench.sessions import measure_sessions
from ctxflow.streams.bench.sink import GOAL_ROWS_PER_S, measure_sink
from ctxflow.streams.bench.throughput import cpu_seconds, raw_ceiling, run_pipeline
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.admin import ensure_topics
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.worker_process import WorkerProcess

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to run: corpus size, active runs for the memory phase, latency duration, probe spacing."""

    events: int = 200_000
    runs_for_memory: int = 100_000
    latency_s: float = 10.0
    admission_every: int = 20
    core_rate_runs: int = 20_000
    #: Partitions of every topic: one worker process reads them all.
    partitions: int = 1
    #: Finished runs of the retired-runs phase (the issue's goal is stated for a million).
    retired_runs: int = 1_000_000
    #: Runs of 60 turns past their watermarks, and summarizer jobs of 10 items, of phase (e'); its planner table
    #: holds ``runs_for_memory`` runs.
    planner_runs: int = 320
    summarizer_jobs: int = 300
    #: Candidates of phase (e''), the memory gate.
    memory_candidates: int = 5_000
    #: Active memory records of phase (e'''), over 100 tenants (the issue's goal is stated for 100,000).
    recall_records: int = 100_000

    @classmethod
    def quick(cls) -> BenchConfig:
        """A smoke run (about a minute): small corpus, 10k runs, short latency window."""
        return cls(events=20_000, runs_for_memory=10_000, latency_s=4.0, core_rate_runs=5_000, retired_runs=20_000,
                   planner_runs=96, summarizer_jobs=60, memory_candidates=2_000,
                   recall_records=20_000)

    @classmethod
    def smoke(cls) -> BenchConfig:
        """The smallest run that still goes through every phase: for the test suite, not for figures."""
        return cls(events=2_000, runs_for_memory=1_000, latency_s=2.0, core_rate_runs=500, retired_runs=2_000,
                   planner_runs=16, summarizer_jobs=4, memory_candidates=200,
                   recall_records=1_000)


def _fresh(base: Settings, home: Path, name: str) -> Settings:
    tag = uuid.uuid4().hex[:8]
    fresh = base.model_copy(update={
        "topic_prefix": f"bench-{name}-{tag}", "app_id": f"bench-{name}-{tag}", "home": home / name,
        "web_port": free_port(),
    })
    ensure_topics(fresh)
    return fresh


def run_bench(settings: Settings, config: BenchConfig, say: Say) -> BenchResults:
    """Run every phase against a private stack built from ``settings`` (batch size, fetch wait, ...) with
    ``config.partitions``; ``settings.partitions``, when it differs, is the comparison's (phase c)."""
    details: dict[str, Any] = {**machine(), "batch_max": settings.batch_max, "partitions": config.partitions,
                               "admission_every": config.admission_every, "cpu_probe_ms": {"start": cpu_probe_ms()}}
    sha = git_sha()
    home = Path(tempfile.mkdtemp(prefix="ctxflow-bench-"))
    try:
        stack_settings = settings.model_copy(update={
            "home": home / "stack", "bootstrap": f"127.0.0.1:{free_port()}",
            "redis_url": f"redis://127.0.0.1:{free_port()}/0", "clickhouse_dsn": None, "schema_registry_url": None,
            # Workers as a deployment runs them (compose/): they decide, and the ClickHouse sink runs apart, in
            # its own process, measured alone in phase (b'). Hosted in the worker, its thread takes the GIL from
            # deciding and its chDB adds hundreds of MiB to the worker's RSS, which phases (d) and (d') measure.
            "sink": "off",
        })
        with EmbeddedStack(stack_settings) as stack:
            results = _phases(stack.settings, home, config, say, details, sha, compare_partitions=settings.partitions)
        results.details["cpu_probe_ms"]["end"] = cpu_probe_ms()
        return results
    finally:
        gc.unfreeze()
        shutil.rmtree(home, ignore_errors=True)


def _settle_heap() -> None:
    """Take the corpus out of the garbage collector's reach before a clock starts.

    This process is the load generator and the latency probe. It holds the corpus (hundreds of thousands of
    long-lived objects), and a full collection that scans them all stalled it for ~0.5 s: no record was sent
    meanwhile, which the worker's fetches showed as the broker's high watermark standing still, and probes sent
    just before waited it out. Frozen objects are never scanned.
    """
    gc.collect()
    gc.freeze()


def _latency_phase(base: Settings, home: Path, corpus: TurnCorpus, rate: float, config: BenchConfig, say: Say,
                   name: str) -> tuple[LatencyResult, float]:
    """Latency at ``rate`` with a fresh worker on fresh topics; (result, the worker's CPU in cores meanwhile).

    Fresh topics because Tansu's memory storage lists a partition's stored batches on every fetch, so on
    topics that already hold the pipeline phase's records its own hop is slower than on a new deployment's
    (see README).
    """
    settings = _fresh(base, home, name)
    asyncio.run(publish(settings, corpus.manifests()))
    turns_needed = int(rate * config.latency_s * config.admission_every / (config.admission_every + 1))
    say(f"  fresh worker and topics; encoding {turns_needed:,} turns")
    probes = corpus.take(turns_needed)
    _settle_heap()
    worker = WorkerProcess(settings, name=f"worker-{name}").start(ready_timeout_s=120)
    try:
        cpu_before, began = cpu_seconds(worker.pid), time.perf_counter()
        latency = asyncio.run(measure_latency(settings, probes, corpus.last, rate, config.admission_every, say))
        cpu = (cpu_seconds(worker.pid) - cpu_before) / (time.perf_counter() - began)
    finally:
        worker.stop()
    (first, second), (broker_first, broker_second) = latency.p99_halves_ms, latency.broker_p99_halves_ms
    say(f"  p50 {latency.p50_ms:.1f} ms, p99 {latency.p99_ms:.1f} ms over {latency.samples:,} admissions "
        f"({latency.missing} unanswered); the broker alone (probe produced -> fetched): "
        f"p50 {latency.broker_p50_ms:.1f} ms, p99 {latency.broker_p99_ms:.1f} ms per hop; "
        f"worker at {cpu:.0%} of a core")
    say(f"  p99 by half of the window: {first:.1f} then {second:.1f} ms end to end, "
        f"{broker_first:.1f} then {broker_second:.1f} ms for the broker alone")
    return latency, cpu


def _rate_details(prefix: str, latency: LatencyResult, worker_cpu: float) -> dict[str, float]:
    """The figures of a latency phase beside the headline one, under ``prefix``."""
    return {f"{prefix}_eps": round(latency.rate_eps), f"{prefix}_p50_latency_ms": round(latency.p50_ms, 1),
            f"{prefix}_p99_latency_ms": round(latency.p99_ms, 1),
            f"{prefix}_worker_cpu_utilisation": round(worker_cpu, 2),
            f"{prefix}_broker_hop_p99_ms": round(latency.broker_p99_ms, 1)}


def _phases(base: Settings, home: Path, config: BenchConfig, say: Say, details: dict[str, Any], sha: str,
            compare_partitions: int) -> BenchResults:
    deployment = base.model_copy(update={"partitions": config.partitions})
    s1 = _fresh(deployment, home, "pipeline")
    corpus = TurnCorpus()
    say(f"corpus: encoding {config.events:,} TurnEvents of {len(corpus.workload.tenants)} tenants")
    records = corpus.manifests() + corpus.take(config.events, lambda n: say(f"  ... {n:,} encoded"))
    details["corpus_bytes_per_record"] = round(sum(len(r.value) for r in records) / len(records))
    _settle_heap()
    say(f"producing {len(records):,} records")
    asyncio.run(publish(s1, records, lambda n: say(f"  ... {n:,} produced")))

    say("(a) raw ceiling: aiokafka consumer + Codec.decode_batch, nothing else")
    raw_eps, raw_cpu_us, rejected = asyncio.run(raw_ceiling(s1, ("manifests", "turns"), len(records)))
    details |= {"raw_cpu_us_per_event": round(raw_cpu_us, 1), "raw_rejected": rejected}
    say(f"  raw_ceiling_eps = {raw_eps:,.0f} ({raw_cpu_us:.1f} us CPU per record)")

    details["cpu_probe_ms"]["pipeline"] = cpu_probe_ms()
    say("(b) pipeline: ctxflow worker from ready to committed offsets at the end")
    run = run_pipeline(s1, len(records), say)
    details |= {"worker_startup_s": round(run.startup_s, 2), "pipeline_seconds": round(run.seconds, 2),
                "worker_cpu_us_per_event": round(run.cpu_s * 1e6 / run.records, 1),
                "worker_cpu_utilisation": round(run.cpu_s / run.seconds, 2)}
    say(f"  pipeline_eps = {run.eps:,.0f} (ratio {run.eps / raw_eps:.2f}; worker CPU "
        f"{details['worker_cpu_us_per_event']} us/record at {details['worker_cpu_utilisation']:.0%} of a core)")
    details["cpu_probe_ms"]["sink"] = cpu_probe_ms()
    say(f"(b') sink: a `ctxflow sink` alone drains the same topics into a fresh chDB (goal >= {GOAL_ROWS_PER_S:,} "
        "rows/s)")
    sink = measure_sink(s1, say)
    details |= {"sink_rows": sink.rows, "sink_flushes": sink.flushes, "sink_seconds": round(sink.seconds, 2),
                "sink_cpu_us_per_row": round(sink.cpu_s * 1e6 / max(sink.rows, 1), 1)}
    rate = run.eps / 2
    details["cpu_probe_ms"]["latency"] = cpu_probe_ms()
    say(f"(c) latency at {rate:,.0f} records/s (half the pipeline rate) for {config.latency_s:.0f}s")
    latency, latency_cpu = _latency_phase(deployment, home, corpus, rate, config, say, "latency")
    details |= {"latency_rate_eps": round(latency.rate_eps), "latency_samples": latency.samples,
                "latency_worker_cpu_utilisation": round(latency_cpu, 2),
                "latency_missing": latency.missing, "max_latency_ms": round(latency.max_ms, 1),
                "broker_hop_p50_ms": round(latency.broker_p50_ms, 1),
                "broker_hop_p99_ms": round(latency.broker_p99_ms, 1),
                "p99_latency_ms_by_half": [round(v, 1) for v in latency.p99_halves_ms],
                "broker_hop_p99_ms_by_half": [round(v, 1) for v in latency.broker_p99_halves_ms]}
    if compare_partitions != config.partitions:
        # The same half rate on the deployment's partition count, right after (the machine and the broker as alike
        # as they get): what the embedded broker's per-partition fetch cost adds (on Apache Kafka a fetch does not
        # depend on how much a partition stores).
        say(f"    and at {rate:,.0f} records/s again with {compare_partitions} partitions per topic")
        spread, spread_cpu = _latency_phase(base.model_copy(update={"partitions": compare_partitions}), home, corpus,
                                            rate, config, say, "latency-partitions")
        details |= {"compared_partitions": compare_partitions,
                    **_rate_details("compared_partitions", spread, spread_cpu)}
    # The same at a quarter of the rate: where the latency stands when the machine is not near its limit.
    say(f"    and at {rate / 2:,.0f} records/s (a quarter of the pipeline rate)")
    light, light_cpu = _latency_phase(deployment, home, corpus, rate / 2, config, say, "latency-quarter")
    details |= _rate_details("quarter_rate", light, light_cpu)

    say(f"(d) sessions: {config.runs_for_memory:,} active runs in a fresh worker, then SIGKILL + restart")
    sessions = measure_sessions(_fresh(deployment, home, "sessions"), config.runs_for_memory, say)
    details |= {"sessions_runs": sessions.runs, "sessions_empty_rss_bytes": sessions.empty_rss_bytes,
                "sessions_warm_rss_bytes": sessions.baseline_rss_bytes,
                "sessions_loaded_rss_bytes": sessions.loaded_rss_bytes,
                "sessions_recovered_rss_bytes": sessions.recovered_rss_bytes,
                "sessions_live_rss_bytes_per_run": round(sessions.live_bytes_per_run)}
    say(f"  {sessions.bytes_per_run:,.0f} RSS bytes per run held (recovered worker vs empty one; "
        f"{sessions.live_bytes_per_run:,.0f} while ingesting); recovery {sessions.recovery_s:.1f}s "
        f"(an empty worker starts in {run.startup_s:.1f}s)")

    say(f"(d') retired runs: {config.retired_runs:,} finished runs, then SIGKILL + restart, against the worker empty")
    retired = measure_retention(_fresh(deployment, home, "retention"), config.retired_runs, say)
    details |= {"retired_runs": retired.runs, "retired_runs_window_s": retired.window_s,
                "retired_runs_records": retired.records, "retired_runs_empty_rss_bytes": retired.empty_rss_bytes,
                "retired_runs_rss_bytes": retired.retired_rss_bytes,
                "retired_runs_empty_restart_s": round(retired.empty_restart_s, 2),
                "retired_runs_restart_s": round(retired.retired_restart_s, 2),
                "retired_runs_preloaded_records": retired.preloaded_records}
    say(f"  RSS {retired.retired_rss_bytes / 2**20:,.0f} MiB vs {retired.empty_rss_bytes / 2**20:,.0f} MiB empty "
        f"(x{retired.rss_ratio:.2f}); restart {retired.retired_restart_s:.1f}s vs {retired.empty_restart_s:.1f}s "
        f"empty (x{retired.restart_ratio:.2f}, {retired.preloaded_records:,} changelog records read)")

    say("(e) budget core in process: TurnEvents per CPU second, heap bytes per run")
    core = measure_core(config.core_rate_runs, config.runs_for_memory)
    details |= {"processor_events": core.processor_events, "processor_decisions": core.processor_decisions}
    say(f"  processor_eps = {core.processor_eps:,.0f}; {core.bytes_per_run:,.0f} bytes/run (tracemalloc)")

    details["cpu_probe_ms"]["eviction"] = cpu_probe_ms()
    say(f"(e') eviction in process: planner table of {config.runs_for_memory:,} runs x {ITEMS_PER_RUN} items "
        f"(goal <= {GOAL_BYTES_PER_ITEM} bytes per item), CPU per eviction decision, summarizer rate")
    ev = measure_eviction(config.runs_for_memory, config.planner_runs, config.summarizer_jobs, say)
    table, planner, summarizer = ev.table, ev.planner, ev.summarizer
    details |= {"eviction_table_runs": table.runs, "eviction_table_items": table.items,
                "eviction_heap_bytes_per_item": round(table.heap_bytes_per_item, 1),
                "eviction_changelog_bytes_per_run": round(table.changelog_bytes_per_run),
                "eviction_bytes_per_item_breakdown": table.breakdown,
                "planner_records": planner.records, "planner_decision_records": planner.decisions,
                "planner_decisions_by_kind": planner.by_kind,
                "planner_no_decision_p50_us": round(planner.quiet_p50_us, 1),
                "planner_budget_only_eps": round(planner.budget_only_eps),
                "summarizer_jobs": summarizer.jobs, "summarizer_items": summarizer.items,
                "summarizer_tokens_per_item": round(summarizer.tokens_per_item),
                "summarizer_mean_fidelity": round(summarizer.fidelity, 3), "eviction_phase_s": round(ev.seconds, 1)}
    say(f"  phase (e') took {ev.seconds:.1f}s")

    details["cpu_probe_ms"]["memory_gate"] = cpu_probe_ms()
    say(f"(e'') memory gate in process: {config.memory_candidates:,} candidates, secret and PII detection on "
        f"(goal >= {GOAL_CANDIDATES_PER_CPU_S:,} per CPU second)")
    gate = measure_memory_gate(config.memory_candidates)
    details |= {"memory_gate_candidates": gate["candidates"], "memory_gate_rules": gate["rules"],
                "memory_processor_candidates_per_cpu_s": gate["processor_candidates_per_cpu_second"]}
    say(f"  gate {gate['gate_candidates_per_cpu_second']:,} candidates/CPU s; whole processor "
        f"{gate['processor_candidates_per_cpu_second']:,}")

    say(f"(e''') recall: {config.recall_records:,} active records of 100 tenants, lexical and vector queries, k=5")
    recall = _recall(config.recall_records)
    details |= {f"recall_{k}": v for k, v in recall.items() if k != "bench"}
    say(f"  p99 lexical {recall['lexical_p99_ms']} ms, vector {recall['vector_p99_ms']} ms "
        f"(records written in {recall['write_s']} s)")
    return BenchResults(
        events=len(records), raw_ceiling_eps=round(raw_eps), pipeline_eps=round(run.eps),
        ratio=round(run.eps / raw_eps, 3), p50_latency_ms=round(latency.p50_ms, 1),
        p99_latency_ms=round(latency.p99_ms, 1), sessions_rss_bytes_per_run=round(sessions.bytes_per_run),
        recovery_s=round(sessions.recovery_s, 2), processor_eps=round(core.processor_eps),
        core_bytes_per_run=round(core.bytes_per_run), git_sha=sha, details=details,
        retired_runs_rss_ratio=round(retired.rss_ratio, 3), retired_runs_restart_ratio=round(retired.restart_ratio, 3),
        eviction_bytes_per_item=round(table.bytes_per_item, 1), planner_p50_us=round(planner.p50_us, 1),
        planner_p99_us=round(planner.p99_us, 1), planner_chain_eps=round(planner.chain_eps),
        summarizer_items_per_cpu_s=round(summarizer.items_per_cpu_s),
        sink_rows_per_s=round(sink.rows_per_s), sink_rows_per_cpu_s=round(sink.rows_per_cpu_s),
        memory_gate_candidates_per_cpu_s=float(gate["gate_candidates_per_cpu_second"]),
        recall_p99_ms=max(float(recall["lexical_p99_ms"]), float(recall["vector_p99_ms"])),
    )


def _recall(records: int) -> dict[str, Any]:
    """Phase (e'''): ``streams.bench.recall`` in a child process (chDB: one data directory per process)."""
    done = subprocess.run([sys.executable, "-m", "ctxflow.streams.bench.recall", "--records", str(records),
                           "--tenants", "100"], capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"recall bench failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))
