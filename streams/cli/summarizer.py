"""``ctxflow summarizer``: run a summarizer worker (compression jobs in, summaries out) in the foreground.

Registered by ``streams/cli/main.py`` as ``app.command()(summarizer)`` from
``ctxflow.streams.cli.summarizer:summarizer``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from ctxflow.streams import logs
from ctxflow.streams.cli.context import ensure_topics_or_exit, settings_of
from rich.console import Console

console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def summarizer(
    ctx: typer.Context,
    batch_max: Annotated[int, typer.Option(min=1, help="Most compression jobs taken per batch.")] = 64,
    loglevel: Annotated[str, typer.Option(help="Log level of the summarizer's structured log (stderr).")] = "info",
) -> None:
    """Run a summarizer worker: reads compression.jobs in its own consumer group (<app_id>-summarizer), publishes
    summaries, dead-letters jobs it cannot summarize; makes missing topics. Uses an OpenAI-compatible endpoint
    when CTXFLOW_SUMMARIZER_URL and CTXFLOW_SUMMARIZER_MODEL are set (optional CTXFLOW_SUMMARIZER_API_KEY),
    falling back to the extractive summarizer when it fails; the extractive one otherwise. Stops within a few
    seconds of SIGTERM or SIGINT."""
    from ctxflow.streams.summarizer.endpoint import configured_summarizer
    from ctxflow.streams.summarizer.worker import run_summarizer

    logs.configure(loglevel)  # at info: a progress line every 30 s
    settings = settings_of(ctx)
    ensure_topics_or_exit(settings, "summarizer", console)
    run_summarizer(settings, configured_summarizer(), batch_max=batch_max)
