"""``ctxflow simulate`` and ``ctxflow bench-quality``: evaluate eviction policies offline.

Registered by ``streams/cli/main.py`` (see ``SUBCOMMANDS`` there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from ctxflow.schemas.models import EvictionStrategy
from rich.console import Console

console = Console(stderr=True, soft_wrap=True, highlight=False)
_STRATEGIES = ", ".join(s.value for s in EvictionStrategy)


def simulate(
    transcripts: Annotated[Path, typer.Option(help="JSONL: one session per line, {session_id, messages} in "
                                                   "OpenAI chat format.", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option(help="Where to write the contexts (JSONL, one line per session per "
                                              "assistant message).")],
    budget: Annotated[float, typer.Option(min=0.001, max=1.0, help="Cap on the context outside the system prompt, "
                                          "as a fraction of each session's full non-system tokens.")] = 0.25,
    strategy: Annotated[str | None, typer.Option(help=f"One of: {_STRATEGIES}. Default: the manifest's, else "
                                                      "hybrid.")] = None,
    manifest: Annotated[Path | None, typer.Option(help="A tenant manifest (YAML or JSON) whose QoS and eviction "
                                                       "policy to use; its history cap is replaced by --budget.",
                                                  exists=True, dir_okay=False)] = None,
) -> None:
    """Replay recorded transcripts through the real processors, offline: what the model would read at each
    assistant message under a budget and strategy. Evaluate a policy on your own logs before turning it on."""
    from ctxflow.streams.sdk.manifest_files import ManifestFileError, load_manifest
    from ctxflow.streams.simulate import TranscriptError, read_sessions, simulate_sessions
    from ctxflow.streams.simulate.run import SessionStats

    if strategy is not None and strategy not in {s.value for s in EvictionStrategy}:
        console.print(f"unknown strategy {strategy!r}: use one of {_STRATEGIES}")
        raise typer.Exit(2)
    try:
        base = load_manifest(manifest).manifest if manifest is not None else None
    except ManifestFileError as error:
        console.print(f"{error}")
        raise typer.Exit(2) from None
    if strategy is None:
        strategy = base.eviction.strategy.value if base is not None and base.eviction is not None else "hybrid"
    stats: dict[str, SessionStats] = {}
    lines = 0
    try:
        with transcripts.open(encoding="utf-8") as source, output.open("w", encoding="utf-8") as sink:
            sessions = read_sessions(source, str(transcripts))
            for line in simulate_sessions(sessions, budget=budget, strategy=strategy, manifest=base, stats=stats):
                sink.write(json.dumps(line, separators=(",", ":")) + "\n")
                lines += 1
                if lines % 500 == 0:
                    console.print(f"{len(stats)} sessions, {lines} steps written")
    except TranscriptError as error:
        console.print(f"{error}")
        raise typer.Exit(2) from None
    decisions: dict[str, int] = {}
    for tally in stats.values():
        for kind, n in tally.decisions.items():
            decisions[kind] = decisions.get(kind, 0) + n
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(decisions.items())) or "no eviction decisions"
    console.print(f"{len(stats)} sessions, {lines} steps -> {output} ({strategy} at {budget:.0%}: {summary})")


def bench_quality(
    sessions: Annotated[int, typer.Option(min=1, help="Generated sessions per (strategy, budget).")] = 40,
    output: Annotated[Path, typer.Option(help="Where to write the results JSON.")] = Path("quality-results.json"),
) -> None:
    """Quality bench: every strategy at 50%, 25% and 10% budgets over generated long-horizon sessions; writes
    quality-results.json and says whether the hybrid meets its targets and where it loses."""
    from ctxflow.streams.bench.quality_run import main

    raise typer.Exit(main(["--sessions", str(sessions), "--output", str(output)]))
