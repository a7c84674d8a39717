"""``make bench-quality``: every eviction strategy at every budget over the same generated sessions.

:func:`run_quality` generates sessions (:mod:`.quality_sessions`), replays them through
``ctxflow.streams.simulate.simulate_sessions`` once per (strategy, budget), scores each run
(:mod:`.quality_score`), writes ``quality-results.json`` and prints a table, the targets and where hybrid
loses. The file: ``{"results": [row per (strategy, budget)], "by_shape": [...], "losses": [...], "targets":
[...], "hybrid_losses": [...], "corpus": {...}, ...}``. Each strategy sees a fresh copy of the sessions, so one
that mutates its input cannot change what the next one is given or what scoring reads.

Targets (displayed, not enforced by the exit code): hybrid retains >= 95% of references at a 25% budget and
>= 85% at 10%, never splits a tool call from its result, and beats every baseline (sliding_window, lru,
observation_masking) on retention at every budget run. A target whose run was not requested reads
"not measured".
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctxflow.streams.bench.quality_score import prepare, score_run
from ctxflow.streams.bench.quality_sessions import corpus_stats, generate_sessions
from ctxflow.streams.bench.report import git_sha
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ctxflow.schemas.models import TenantManifest

STRATEGIES = ("sliding_window", "lru", "importance", "relevance", "observation_masking", "summarization",
              "retrieval_augmented", "hybrid")
BASELINES = ("sliding_window", "lru", "observation_masking")
BUDGETS = (0.5, 0.25, 0.1)
DEFAULT_SESSIONS = 40
DEFAULT_SEED = 7
RESULTS_FILE = Path("quality-results.json")
#: (budget, minimum retention) hybrid must reach.
HYBRID_FLOORS = ((0.25, 0.95), (0.1, 0.85))
#: A log or pipe gets the full table (rich would assume 80 columns); a terminal keeps its own width.
_CONSOLE = Console(width=None if sys.stdout.isatty() else 132)


def run_quality(budgets: Sequence[float] = BUDGETS, strategies: Sequence[str] = STRATEGIES,
                sessions: int = DEFAULT_SESSIONS, seed: int = DEFAULT_SEED, *,
                output: Path | str | None = RESULTS_FILE, manifest: TenantManifest | None = None,
                console: Console | None = _CONSOLE) -> dict[str, Any]:
    """Run every (strategy, budget), write ``output`` (unless None), print progress and the summary to
    ``console`` (None: silent); return the results."""
    from ctxflow.streams.simulate import simulate_sessions

    say: Callable[[str], None] = console.print if console is not None else (lambda _: None)
    corpus, truth = generate_sessions(sessions, seed)
    facts = prepare(corpus, truth)
    say(f"quality bench: {sessions} sessions (seed {seed}), {sum(len(t['references']) for t in truth)} references, "
        f"{len(strategies)} strategies x {len(budgets)} budgets")
    rows, by_shape, losses, missed = [], [], [], {}
    runs = [(b, s) for b in budgets for s in strategies]
    for k, (budget, strategy) in enumerate(runs, 1):
        started = time.perf_counter()
        lines = simulate_sessions(copy.deepcopy(corpus), budget=budget, strategy=strategy, manifest=manifest)
        score = score_run(facts, lines, strategy=strategy, budget=budget)
        row = score.row()
        row["elapsed_s"] = round(time.perf_counter() - started, 2)
        for shape, rates in row.pop("by_shape").items():
            by_shape.append({"strategy": strategy, "budget": budget, "shape": shape, **rates})
        losses.extend({"strategy": strategy, "budget": budget, **loss} for loss in row.pop("losses"))
        missed[(strategy, budget)] = score.missed
        rows.append(row)
        say(f"[{k}/{len(runs)}] {strategy} @ {budget:.0%}: retention {row['retention']:.1%}, "
            f"violations {row['tool_pairing_violations']}, tokens {row['tokens_share']:.1%} of full, "
            f"{row['elapsed_s']:.1f} s")
    results = {
        "results": rows, "by_shape": by_shape, "losses": losses,
        "targets": check_targets(rows, budgets),
        "hybrid_losses": hybrid_losses(rows, missed),
        "corpus": corpus_stats(corpus, truth), "sessions": sessions, "seed": seed, "git_sha": git_sha(),
    }
    if output is not None:
        path = Path(output)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, path)
    if console is not None:
        print_summary(results, console)
    return results


def _row(rows: list[dict], strategy: str, budget: float) -> dict | None:
    return next((r for r in rows if r["strategy"] == strategy and math.isclose(r["budget"], budget)), None)


def check_targets(rows: list[dict], budgets: Sequence[float]) -> list[dict]:
    """Each target with ``holds`` (True, False, or None when its runs were not requested) and a detail."""
    out = []
    for budget, floor in HYBRID_FLOORS:
        r = _row(rows, "hybrid", budget)
        out.append({"target": f"hybrid retention >= {floor:.0%} at {budget:.0%} budget",
                    "holds": None if r is None else r["retention"] >= floor,
                    "detail": "not measured" if r is None else f"{r['retention']:.1%}"})
    hybrid = [r for r in rows if r["strategy"] == "hybrid"]
    bad = [f"{r['budget']:.0%}: {r['tool_pairing_violations']}" for r in hybrid if r["tool_pairing_violations"]]
    out.append({"target": "hybrid: zero tool-pairing violations", "holds": None if not hybrid else not bad,
                "detail": "not measured" if not hybrid else ("none" if not bad else "; ".join(bad))})
    lost, unmeasured = [], []
    for budget in budgets:
        h = _row(rows, "hybrid", budget)
        for base in BASELINES:
            b = _row(rows, base, budget)
            if h is None or b is None:
                unmeasured.append(f"{base} at {budget:.0%}")
            elif h["retention"] <= b["retention"]:
                lost.append(f"{base} at {budget:.0%} ({b['retention']:.1%} vs hybrid {h['retention']:.1%})")
    detail = "; ".join([*(["not above " + "; ".join(lost)] if lost else []),
                        *(["not measured: " + ", ".join(unmeasured)] if unmeasured else [])]) or "yes"
    # Any loss fails it; it holds only when every baseline was run at every budget and lost to hybrid.
    out.append({"target": "hybrid beats sliding_window, lru, observation_masking at every budget",
                "holds": False if lost else (None if unmeasured else True), "detail": detail})
    return out


def hybrid_losses(rows: list[dict], missed: dict[tuple[str, float], list[dict]]) -> list[dict]:
    """Per budget where hybrid missed anything: its weakest shape and the kinds (and reasons) of what it missed."""
    out = []
    for r in rows:
        if r["strategy"] != "hybrid" or not missed.get(("hybrid", r["budget"])):
            continue
        misses = missed[("hybrid", r["budget"])]
        shapes = Counter(m["shape"] for m in misses)
        out.append({
            "budget": r["budget"], "retention": r["retention"], "missed": len(misses),
            "by_shape": dict(shapes.most_common()),
            "kinds": dict(Counter(f"{m['item_kind']} ({m['why']})" for m in misses).most_common(6)),
            "fact_kinds": dict(Counter(m["fact_kind"] for m in misses).most_common(6)),
        })
    return out


def print_summary(results: dict, console: Console) -> None:
    """The table of every run, the targets and where hybrid loses."""
    table = Table(title=f"context quality over {results['sessions']} sessions (steps with a violation or a "
                  "tier-0 eviction; tokens per step and as a share of the full session; new summaries per 10 steps)")
    for name in ("strategy", "budget", "retention", "violations", "tier-0", "tokens", "share", "summ/10", "append"):
        table.add_column(name, no_wrap=True, justify="left" if name == "strategy" else "right")
    for r in results["results"]:
        table.add_row(r["strategy"], f"{r['budget']:.0%}", f"{r['retention']:.1%}", str(r["tool_pairing_violations"]),
                      str(r["tier0_evictions"]), f"{r['tokens_used']:,.0f}", f"{r['tokens_share']:.1%}",
                      f"{r['compressions_per_10_turns']:.2f}", f"{r['append_only_share']:.0%}")
    console.print(table)
    for t in results["targets"]:
        mark = {True: "[green]holds[/]", False: "[red]FAILS[/]", None: "[yellow]not measured[/]"}[t["holds"]]
        console.print(f"{mark}  {t['target']}: {t['detail']}")
    for loss in results["hybrid_losses"]:
        weakest = min((s for s in results["by_shape"] if s["strategy"] == "hybrid"
                       and math.isclose(s["budget"], loss["budget"])), key=lambda s: s["retention"])
        kinds = ", ".join(f"{k} x{n}" for k, n in loss["kinds"].items())
        console.print(f"hybrid loses at {loss['budget']:.0%}: {loss['missed']} references missed, weakest shape "
                      f"{weakest['shape']} ({weakest['retention']:.1%}); missed {kinds}")


def main(argv: list[str] | None = None) -> int:
    """``python -m ctxflow.streams.bench.quality_run [--sessions N] [--output FILE]``; 2 when simulate is missing."""
    parser = argparse.ArgumentParser(prog="python -m ctxflow.streams.bench.quality_run",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS, help="generated sessions (shapes rotate)")
    parser.add_argument("--output", type=Path, default=RESULTS_FILE, help="where to write the results JSON")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated fractions")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated strategy names")
    args = parser.parse_args(argv)
    try:
        import ctxflow.streams.simulate  # noqa: F401
    except ImportError as exc:
        _CONSOLE.print(f"[red]ctxflow.streams.simulate is not available: {exc}[/]")
        return 2
    run_quality(tuple(float(b) for b in args.budgets.split(",")), tuple(args.strategies.split(",")),
                args.sessions, args.seed, output=args.output)
    _CONSOLE.print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
