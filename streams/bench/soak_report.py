"""What a soak measured, the verdict on it and ``soak-results.json``: pure, so the arithmetic is testable alone.

The target (issue 13): lag never above ``lag_limit_s`` and every published record committed by the end. A soak
that misses it says where: the first period whose lag went over the limit (``broke_at_minute``) and how many
records were never committed.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctxflow.streams.bench.latency import percentile

__all__ = ["GroundTotals", "SoakMinute", "SoakResults", "minute_line", "p99_ms", "totals_problems"]

_MB = 1024 * 1024


@dataclass(frozen=True)
class SoakMinute:
    """One reporting period (a minute unless the soak was given another ``interval_s``).

    Counts are records on the input topics: ``published`` by this soak (events, manifests and latency probes),
    ``committed`` by the worker's consumer group; both cumulative, with the period's share beside them.
    ``lag_records``/``lag_s`` are as of the period's end, ``max_lag_s`` the largest of its samples, and
    ``max_lag_in`` the input partition (``turns:2``) that held the oldest record then. ``p99_ms`` is
    the decision latency of the probes sent in the period (nearest rank: with 60 probes it is their maximum);
    a probe still unanswered counts at its age so far, and ``unanswered`` says how many did. CPU is in cores
    (CPU seconds per wall second over the period), RSS at the period's end; a process replaced in the period
    (a killed worker) is charged for both.
    """

    minute: int
    elapsed_s: float
    published: int
    published_in_minute: int
    committed: int
    committed_in_minute: int
    lag_records: int
    lag_s: float
    max_lag_s: float
    max_lag_in: str | None
    p99_ms: float | None
    probes: int
    unanswered: int
    worker_pid: int
    worker_rss_mb: float | None
    worker_cpu_cores: float
    broker_rss_mb: float | None
    broker_cpu_cores: float


def p99_ms(latencies_s: list[float]) -> float | None:
    """The nearest-rank p99 of ``latencies_s`` in milliseconds, None without samples."""
    return round(percentile(sorted(latencies_s), 99) * 1000, 1) if latencies_s else None


def minute_line(m: SoakMinute) -> str:
    """The line a soak prints for a period."""
    rss = lambda mb: "?" if mb is None else f"{mb:,.0f}MB"  # noqa: E731
    p99 = "-" if m.p99_ms is None else f"{m.p99_ms:,.0f}ms"
    late = f" ({m.unanswered} unanswered)" if m.unanswered else ""
    where = f" on {m.max_lag_in}" if m.max_lag_in else ""
    return (f"min {m.minute:>3}  published {m.published:>11,} (+{m.published_in_minute:,})  committed "
            f"{m.committed:>11,} (+{m.committed_in_minute:,})  lag {m.lag_records:,} rec {m.lag_s:.1f}s "
            f"(max {m.max_lag_s:.1f}s{where})  p99 {p99}{late}  worker {rss(m.worker_rss_mb)} "
            f"{m.worker_cpu_cores:.2f}cpu  broker {rss(m.broker_rss_mb)} {m.broker_cpu_cores:.2f}cpu")


@dataclass
class GroundTotals:
    """What the budget must hold for what was published, counted as it was published (per tenant)."""

    turns: Counter[str] = field(default_factory=Counter)
    turn_tokens: Counter[str] = field(default_factory=Counter)
    usage_reports: Counter[str] = field(default_factory=Counter)
    usage_tokens: Counter[str] = field(default_factory=Counter)


def totals_problems(truth: GroundTotals, clickhouse_turns: dict[str, tuple[int, int]],
                    clickhouse_usage: dict[str, tuple[int, int]], spend: dict[str, int] | None) -> list[str]:
    """Where the worker's totals differ from ``truth``: ClickHouse turns ``tenant -> (count, tokens)``, usage
    ``tenant -> (reports, tokens)``, and the tenants' spend ledgers ``tenant -> reported tokens`` (None: not read)."""
    tenants = sorted(set(truth.turns) | set(truth.usage_reports) | set(clickhouse_turns) | set(clickhouse_usage))
    problems = []
    for t in tenants:
        want_turns, want_usage = (truth.turns[t], truth.turn_tokens[t]), (truth.usage_reports[t], truth.usage_tokens[t])
        if clickhouse_turns.get(t, (0, 0)) != want_turns:
            problems.append(f"{t}: ClickHouse turns (count, tokens) {clickhouse_turns.get(t)}, published {want_turns}")
        if clickhouse_usage.get(t, (0, 0)) != want_usage:
            problems.append(f"{t}: ClickHouse usage (reports, tokens) {clickhouse_usage.get(t)}, "
                            f"published {want_usage}")
        if spend is not None and spend.get(t, 0) != truth.usage_tokens[t]:
            problems.append(f"{t}: spend ledger {spend.get(t, 0)} reported tokens, published {truth.usage_tokens[t]}")
    return problems


@dataclass
class SoakResults:
    """Everything ``soak-results.json`` holds. ``committed_ratio`` is committed / published records (with
    ``publishing_complete`` False the broker never acknowledged some of them);
    ``worker_rss_growth`` the worker's RSS at the end over its RSS at the end of the first period (a restarted
    worker's RSS at the end when it was killed); ``max_lag_s`` the largest lag sample of the whole run, the
    catch-up after publishing included."""

    minutes: float
    rate_eps: float
    interval_s: float
    lag_limit_s: float
    published: int
    committed: int
    in_log: int
    committed_ratio: float
    max_lag_s: float
    max_lag_records: int
    broke_at_minute: int | None
    broke_at_s: float | None
    worker_rss_growth: float | None
    achieved_rate_eps: float
    publishing_complete: bool
    catch_up_s: float | None
    killed_worker_at: float | None
    worker_restart_s: float | None
    totals_match: bool | None
    totals_problems: list[str]
    series: list[SoakMinute]
    git_sha: str
    workload_events: int | None
    probes: dict[str, Any]

    @property
    def lag_held(self) -> bool:
        """Lag stayed within the limit; with a killed worker, until the kill (its recovery is not held to it)."""
        return self.broke_at_s is None or (
            self.killed_worker_at is not None and self.broke_at_s >= self.killed_worker_at * self.interval_s)

    @property
    def target_met(self) -> bool:
        """Lag held, every published record committed, and (if checked) the totals right."""
        return (self.publishing_complete and self.lag_held and self.committed_ratio == 1.0
                and self.totals_match is not False)

    def verdict(self) -> str:
        """One sentence: the target met, or where the soak broke."""
        if self.target_met:
            killed = "" if self.killed_worker_at is None else (
                f" (the worker SIGKILLed at {self.killed_worker_at:g} was replaced in {self.worker_restart_s}s; lag "
                "is held to the limit only before the kill)")
            return (f"target met: {self.published:,} records at {self.achieved_rate_eps:,.0f}/s for "
                    f"{self.minutes:g} periods, all committed, lag at most {self.max_lag_s:.1f}s{killed}")
        why = [] if self.publishing_complete else ["the broker stopped acknowledging what was published"]
        if not self.lag_held:
            why.append(f"lag first exceeded {self.lag_limit_s:g}s in minute {self.broke_at_minute} "
                       f"({self.broke_at_s:.0f}s in) "
                       f"(max {self.max_lag_s:.1f}s, {self.max_lag_records:,} records)")
        if self.committed_ratio != 1.0:
            why.append(f"{self.published - self.committed:,} of {self.published:,} published records were not "
                       f"committed (ratio {self.committed_ratio:.6f})")
        if self.totals_match is False:
            why.append(f"totals differ from what was published: {'; '.join(self.totals_problems[:3])}")
        return "target missed: " + "; ".join(why)

    def to_json(self) -> dict[str, Any]:
        """The JSON document (NaN-free: a missing figure is null)."""
        out = asdict(self)
        out["target_met"] = self.target_met
        out["verdict"] = self.verdict()
        return _finite(out)

    def write(self, path: Path) -> None:
        """Write ``to_json()`` to ``path``, pretty-printed."""
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
