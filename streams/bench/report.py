"""The benchmark's results: one JSON object (``bench-results.json``) and a summary against the targets."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Targets of the budget issue, on a 2-core machine: (field, comparison, bound, label).
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("pipeline_eps", ">=", 20_000, "turn events/s end to end, budget decisions in the path"),
    ("p99_latency_ms", "<", 100, "produce -> decision available, at half the pipeline rate"),
)
#: Floors that guard the budget core (they were timed unit tests): (field, comparison, bound, label).
CORE_FLOORS: tuple[tuple[str, str, float, str], ...] = (
    ("processor_eps", ">=", 40_000, "TurnEvents per CPU second through process()"),
    ("core_bytes_per_run", "<", 1_200, "heap bytes per active run in the budget core"),
)
#: Goals of bounded state (issue 13): a worker after retired runs against the same worker empty.
RETENTION_GOALS: tuple[tuple[str, str, float, str], ...] = (
    ("retired_runs_rss_ratio", "<=", 1.1, "worker RSS after the retired-runs phase / empty worker"),
    ("retired_runs_restart_ratio", "<=", 1.1, "restart to ready after them / empty worker"),
)
#: Goal of the ClickHouse sink (issue 16): rows written per second into chDB, the sink alone.
SINK_GOALS: tuple[tuple[str, str, float, str], ...] = (
    ("sink_rows_per_s", ">=", 200_000, "ClickHouse sink alone, rows/s into chDB"),
)
#: Goal of the memory gate (issue 15): candidates per CPU second with secret and PII detection on.
MEMORY_GOALS: tuple[tuple[str, str, float, str], ...] = (
    ("memory_gate_candidates_per_cpu_s", ">=", 2_000, "memory gate, candidates/CPU s, detectors on"),
)
#: Goal of the eviction planner's table: 100,000 active runs of 40 live items each.
EVICTION_GOALS: tuple[tuple[str, str, float, str], ...] = (
    ("eviction_bytes_per_item", "<=", 160, "RSS bytes per live item in the planner's table"),
)


@dataclass
class BenchResults:
    """Everything one ``ctxflow bench`` run measured (rates in input records per second)."""

    events: int
    raw_ceiling_eps: float
    pipeline_eps: float
    ratio: float
    p50_latency_ms: float
    p99_latency_ms: float
    sessions_rss_bytes_per_run: float
    recovery_s: float
    processor_eps: float
    core_bytes_per_run: float
    git_sha: str
    details: dict[str, Any] = field(default_factory=dict)
    retired_runs_rss_ratio: float = 0.0
    retired_runs_restart_ratio: float = 0.0
    #: Phase (e'): the planner's table, thread CPU per record that carries an eviction decision, records per CPU
    #: second through the processor chain, the summarizer's source items per CPU second.
    eviction_bytes_per_item: float = 0.0
    planner_p50_us: float = 0.0
    planner_p99_us: float = 0.0
    planner_chain_eps: float = 0.0
    summarizer_items_per_cpu_s: float = 0.0
    #: Phase (b'): the ClickHouse sink alone, rows per wall second and per CPU second of its process.
    sink_rows_per_s: float = 0.0
    sink_rows_per_cpu_s: float = 0.0
    #: Phase (e''): candidates per CPU second through the memory gate, secret and PII detection on.
    memory_gate_candidates_per_cpu_s: float = 0.0
    #: Phase (e'''): recall p99 over 100,000 active records of 100 tenants (the slower of lexical and vector), ms.
    recall_p99_ms: float = 0.0

    def to_json(self) -> str:
        """The results as one JSON object, details flattened in (they never shadow a headline field)."""
        data = asdict(self)
        details = data.pop("details")
        return json.dumps({**details, **data}, indent=2, sort_keys=True, default=str)

    def write(self, path: Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        os.replace(tmp, path)


def verdicts(results: BenchResults) -> list[tuple[str, str, str, bool]]:
    """``(metric, measured, target, met)`` for every target, core floor, bounded-state, eviction and sink goal."""
    rows = []
    for name, op, bound, label in (*TARGETS, *CORE_FLOORS, *RETENTION_GOALS, *EVICTION_GOALS, *SINK_GOALS,
                                   *MEMORY_GOALS):
        value = float(getattr(results, name))
        met = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
        shown = f"{value:,.3f}" if bound < 10 else f"{value:,.1f}"
        rows.append((f"{name} ({label})", shown, f"{op} {bound:,.0f}" if bound >= 10 else f"{op} {bound}", met))
    return rows


def git_sha(cwd: Path | None = None) -> str:
    """HEAD's sha, with ``-dirty`` when the work tree has changes; ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def cpu_probe_ms() -> float:
    """Milliseconds one core takes for a fixed pure-Python loop (best of five): how fast the machine is now.

    Shared virtual machines change speed (the same loop measured up to 1.8x slower here, for minutes at a time,
    whatever the machine itself was doing); taken before each phase, it tells a slow run from a slow machine.
    It sees the machine between phases, not under a phase's own load.
    """
    best = float("inf")
    for _ in range(5):
        started, total = time.perf_counter(), 0
        for i in range(1_000_000):
            total += i * i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def machine() -> dict[str, Any]:
    """Facts about where the numbers were taken (a loaded machine explains a bad run)."""
    return {
        "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }
