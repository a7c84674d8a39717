"""``ctxflow summarizer``: run a summarizer worker (compression jobs in, summaries out) in the foreground.

Registered by ``streams/cli/main.py`` as ``app.command()(summarizer)`` from
``ctxflow.streams.cli.summarizer:summarizer``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from aiokafka.errors import KafkaError
from ctxflow.streams import logs
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.admin import TopicMismatch, ensure_topics
from rich.console import Console

console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def _settings(ctx: typer.Context) -> Settings:
    # Not streams.cli.main.settings_of: main imports this module to register the command (circular import).
    settings = ctx.find_root().obj
    assert isinstance(settings, Settings), "the root callback always sets Settings"
    return settings


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
    settings = _settings(ctx)
    try:
        ensure_topics(settings)
    except TopicMismatch as err:
        console.print(f"ctxflow summarizer cannot start: {err}. Recreate those topics with the catalogue's settings "
                      "or set CTXFLOW_PARTITIONS to their partition count.", style="red")
        raise typer.Exit(1) from err
    except (KafkaError, OSError) as err:
        console.print(f"ctxflow summarizer cannot start: the broker at {settings.bootstrap} did not answer ({err!r}); "
                      "check that it runs (`ctxflow up`) and CTXFLOW_BOOTSTRAP.", style="red")
        raise typer.Exit(1) from err
    run_summarizer(settings, configured_summarizer(), batch_max=batch_max)
