"""``ctxflow sink``: run the ClickHouse sink in the foreground, apart from the deciding workers.

Registered by ``streams/cli/main.py`` as ``app.command()(sink)`` from ``ctxflow.streams.cli.sink:sink``.
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
    settings = _settings(ctx)
    if web_port is not None:
        settings = settings.model_copy(update={"sink_web_port": web_port})
    try:
        ensure_topics(settings)
    except TopicMismatch as err:
        console.print(f"ctxflow sink cannot start: {err}. Recreate those topics with the catalogue's settings or set "
                      "CTXFLOW_PARTITIONS to their partition count.", style="red")
        raise typer.Exit(1) from err
    except (KafkaError, OSError) as err:
        console.print(f"ctxflow sink cannot start: the broker at {settings.bootstrap} did not answer ({err!r}); "
                      "check that it runs (`ctxflow up`) and CTXFLOW_BOOTSTRAP.", style="red")
        raise typer.Exit(1) from err
    try:
        run_sink(settings)
    except BackendHeld as err:
        console.print(f"ctxflow sink cannot start: {err}. Stop that process, or start the workers with "
                      "CTXFLOW_SINK=off and this sink first.", style="red")
        raise typer.Exit(1) from err
