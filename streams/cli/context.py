"""What every ``ctxflow`` command starts from: this invocation's Settings, topics that match the catalogue, what to
say when the broker does not answer, and who an operator is.

Its own module, beneath ``streams.cli.main`` and every module that registers a command there, so that those
modules can use it without importing ``main`` (which imports them).
"""

from __future__ import annotations

import getpass

import typer
from aiokafka.errors import KafkaError
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.admin import TopicMismatch, ensure_topics
from rich.console import Console


def settings_of(ctx: typer.Context) -> Settings:
    """The Settings built from this invocation's global flags and environment."""
    settings = ctx.find_root().obj
    assert isinstance(settings, Settings), "the root callback always sets Settings"
    return settings


def ensure_topics_or_exit(settings: Settings, command: str, console: Console) -> None:
    """Create the catalogue's missing topics; when that fails, say why and what to do, and exit 1."""
    try:
        ensure_topics(settings)
    except TopicMismatch as err:
        console.print(f"ctxflow {command} cannot start: {err}. Recreate those topics with the catalogue's settings "
                      "(`ctxflow topics create` after deleting them) or set CTXFLOW_PARTITIONS to their partition "
                      "count.", style="red")
        raise typer.Exit(1) from err
    except (KafkaError, OSError) as err:
        console.print(f"ctxflow {command} cannot start: the broker at {settings.bootstrap} did not answer ({err!r}); "
                      "check that it runs (`ctxflow up`) and CTXFLOW_BOOTSTRAP.", style="red")
        raise typer.Exit(1) from err


def unreachable(settings: Settings) -> str:
    """What to do when the broker does not answer."""
    return (f"cannot reach the Kafka broker at {settings.bootstrap}: start a stack with `ctxflow up`, or point "
            "CTXFLOW_BOOTSTRAP (or --bootstrap) at a running broker")


def operator_name() -> str:
    """Who an operator's change is recorded as when no --by is given."""
    try:
        return f"ctxflow-cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in some containers
        return "ctxflow-cli"
