"""``ctxflow sink``: run the ClickHouse sink in the foreground, apart from the deciding workers.

Registered by ``streams/cli/main.py`` as ``app.command()(sink)`` from ``ctxflow.streams.cli.sink:sink``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from ctxflow.streams import logs
from ctxflow.streams.cli.context import ensure_topics_or_exit, settings_of
from rich.console import Console

console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def sink(
    ctx: typer.Context,
    web_port: Annotated[int | None, typer.Option(help="Port of its /query and /health endpoint.")] = None,
    loglevel: Annotated[str, typer.Option(help="Log level of the sink's structured log (stderr).")] = "info",
) -> None:
    """Run a ClickHouse sink: reads turns, usage, runs, decisions, dead letters, memory records and invalidations in
    its own consumer group (<app_id>-sink) and writes them to CTXFLOW_CLICKHOUSE_DSN, committing only what it
    wrote; retries with backoff while the backend fails. Serves /query and /health on 127.0.0.1 (--web-port,
    CTXFLOW_SINK_WEB_PORT). With a ClickHouse server run several (they share partitions); with the embedded chDB
    one, beside workers started with CTXFLOW_SINK=off. Stops within a few seconds of SIGTERM or SIGINT."""
    from ctxflow.streams.sink.ownership import BackendHeld
    from ctxflow.streams.sink.serve import run_sink

    logs.configure(loglevel)
    settings = settings_of(ctx)
    if web_port is not None:
        settings = settings.model_copy(update={"sink_web_port": web_port})
    ensure_topics_or_exit(settings, "sink", console)
    try:
        run_sink(settings)
    except BackendHeld as err:
        console.print(f"ctxflow sink cannot start: {err}. Stop that process, or start the workers with "
                      "CTXFLOW_SINK=off and this sink first.", style="red")
        raise typer.Exit(1) from err
