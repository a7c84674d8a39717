"""The ``ctxflow`` command line: ``ctxflow [GLOBAL OPTIONS] COMMAND``.

Global options build one ``Settings`` (flags override ``CTXFLOW_*`` environment, which overrides defaults)
and every command reads it with ``settings_of(ctx)``. Adding a command is one decorated function here, or a
``typer.Typer`` in another module named in ``SUBCOMMAND_GROUPS`` at the bottom of this file, or commands another
module adds to a group (``GROUP_MEMBERS``).
"""

from __future__ import annotations

import dataclasses
import importlib
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from ctxflow.streams import logs
from ctxflow.streams.cli.context import ensure_topics_or_exit, settings_of
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.admin import ensure_topics
from ctxflow.streams.stack.embedded import EmbeddedStack, StackState, kafka_answers, redis_answers, stop_detached
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="ctxflow: streaming context governor.", no_args_is_help=True, add_completion=False)
# Soft wrap: export lines must stay copy-pasteable. No markup by default: paths and logs may hold "[".
console = Console(soft_wrap=True, markup=False, highlight=False)


@app.callback()
def _global_options(
    ctx: typer.Context,
    home: Annotated[Path | None, typer.Option(help="Stack directory (state, logs, chDB).")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka host:port.")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL.")] = None,
    clickhouse_dsn: Annotated[str | None, typer.Option(help="ClickHouse DSN.")] = None,
    topic_prefix: Annotated[str | None, typer.Option(help="Topic name prefix.")] = None,
    partitions: Annotated[int | None, typer.Option(help="Event topic partitions.")] = None,
    log_level: Annotated[str, typer.Option(help="Python logging level.")] = "WARNING",
) -> None:
    """Each option also reads CTXFLOW_<OPTION> from the environment; a flag wins over the environment."""
    logs.configure(log_level)
    flags: dict[str, Any] = {
        "home": home, "bootstrap": bootstrap, "redis_url": redis_url, "clickhouse_dsn": clickhouse_dsn,
        "topic_prefix": topic_prefix, "partitions": partitions,
    }
    ctx.obj = Settings(**{name: value for name, value in flags.items() if value is not None})


def _print_connection(settings: Settings) -> None:
    console.print(f"Kafka bootstrap : {settings.bootstrap}")
    console.print(f"Redis           : {settings.redis_url}")
    console.print(f"ClickHouse      : {settings.chdb_dsn}")
    console.print("Point ctxflow processes at this stack with:")
    for name, value in (
        ("CTXFLOW_HOME", settings.home), ("CTXFLOW_BOOTSTRAP", settings.bootstrap),
        ("CTXFLOW_REDIS_URL", settings.redis_url), ("CTXFLOW_CLICKHOUSE_DSN", settings.chdb_dsn),
        ("CTXFLOW_TOPIC_PREFIX", settings.topic_prefix),
    ):
        console.print(f"  export {name}={value}")


def _wait_for_signal_or_death(stack: EmbeddedStack) -> None:
    while all(p.exit_code() is None for p in stack.processes):
        if (received := signal.sigtimedwait({signal.SIGINT, signal.SIGTERM}, 1.0)) is not None:
            # Each server that ignores SIGTERM (a hung one) costs its grace period before the kill: bounded.
            from ctxflow.streams.runtime.stop_deadline import StopDeadline

            name = signal.Signals(received.si_signo).name
            StopDeadline("ctxflow up", "its servers are attached to it and die with it",
                         exit_code=128 + received.si_signo).arm(name)
            return
    dead = [p.name for p in stack.processes if p.exit_code() is not None]
    console.print(f"{', '.join(dead)} exited; stopping the stack", style="red")


@app.command()
def up(
    ctx: typer.Context,
    foreground: Annotated[bool, typer.Option(help="Stay attached; Ctrl-C or SIGTERM stops it.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds each server may take to answer.")] = 30.0,
) -> None:
    """Start broker + Redis (+ chDB directory) and create the topics; detaches unless --foreground."""
    settings = settings_of(ctx)
    state = StackState.load(settings.home.resolve())
    if state is not None and any(state.alive().values()):
        console.print(f"a stack already runs under {settings.home} (ctxflow down stops it)", style="red")
        raise typer.Exit(1)
    stop_detached(settings.home)  # forget a stale state file whose processes are gone
    stack = EmbeddedStack(settings, detached=not foreground, ready_timeout_s=timeout)
    try:
        stack.start()
        ensure_topics(stack.settings)
    except BaseException as err:
        stack.stop()
        if not isinstance(err, Exception):
            raise
        console.print(f"ctxflow up failed: {err}", style="red")
        raise typer.Exit(1) from err
    if foreground:
        # Block before the banner: its reader may signal at once, and that signal must reach sigtimedwait.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    servers = ", ".join(
        f"{name} pid {pid} ready in {stack.startup_s[name] * 1000:.0f} ms" for name, pid in stack.pids.items()
    )
    console.print(f"stack up: {servers}; logs in {stack.logs_dir}", style="green")
    _print_connection(stack.settings)
    if foreground:
        try:
            _wait_for_signal_or_death(stack)
        finally:
            stack.stop()


@app.command()
def down(ctx: typer.Context) -> None:
    """Stop the detached stack started by ``ctxflow up`` under --home."""
    home = settings_of(ctx).home
    stopped = stop_detached(home)
    console.print(f"stopped {', '.join(stopped)}" if stopped else f"no running stack under {home}")


@app.command()
def status(
    ctx: typer.Context,
    web_port: Annotated[int | None, typer.Option(help="Port of the worker's health endpoint.")] = None,
) -> None:
    """Show the detached stack under --home and the worker on --web-port; exits 1 unless every server runs and
    answers, and when the worker reports itself degraded or its ClickHouse sink failing (no worker answering is
    not an error)."""
    settings = settings_of(ctx)
    home = settings.home.resolve()
    state = StackState.load(home)
    stack_ok = state is not None
    if state is None:
        console.print(f"no stack under {home}")
    else:
        answers = {"broker": kafka_answers(state.bootstrap), "redis": redis_answers(state.redis_url)}
        alive = state.alive()
        table = Table("server", "pid", "running", "answering")
        for name, record in state.processes.items():
            table.add_row(name, str(record.pid), str(alive[name]), str(answers.get(name)))
        console.print(table)
        console.print("logs: " + " ".join(str(record.log) for record in state.processes.values()))
        console.print(f"bootstrap {state.bootstrap}  redis {state.redis_url}  clickhouse {state.clickhouse_dsn}")
        stack_ok = all(alive.values()) and all(answers.values())
    worker_ok = _print_worker_health(settings.web_port if web_port is None else web_port)
    if not (stack_ok and worker_ok):
        raise typer.Exit(1)


def _print_worker_health(web_port: int) -> bool:
    """Print the ``/health`` of the worker on ``web_port``, per input partition, and its ClickHouse sink; False only
    when it is degraded or its sink failing."""
    from ctxflow.streams.stack.worker_process import worker_health

    try:
        health = worker_health(web_port)
    except (OSError, ValueError) as error:
        console.print(f"no worker answers on 127.0.0.1:{web_port} ({getattr(error, 'reason', error)}); "
                      "`ctxflow worker` starts one, --web-port or CTXFLOW_WEB_PORT names another")
        return True
    table = Table("topic", "partition", "lag", "last commit (s ago)", "last fetch (s ago)", "state")
    for p in health.get("progress", []):
        table.add_row(p["topic"], str(p["partition"]), "?" if p["lag"] is None else f"{p['lag']:,}",
                      f"{p['last_commit_age_s']:.1f}",
                      "never" if p["last_fetch_age_s"] is None else f"{p['last_fetch_age_s']:.1f}", p["state"])
    console.print(table)
    status = health["status"]
    console.print(f"worker on 127.0.0.1:{web_port}: {status}" + (
        f" (an input partition has waited over {health['stall_after_s']:g}s with no commit advancing; the "
        "worker's log says since when)" if status == "degraded" else ""
    ), style="red" if status == "degraded" else None)
    sink = health.get("sink", {})
    console.print(f"ClickHouse sink: {_sink_line(sink)}", style=None if sink.get("healthy", True) else "red")
    return status != "degraded" and sink.get("healthy", True)


def _sink_line(sink: dict[str, Any]) -> str:
    """One line on the ClickHouse sink a worker's ``/health`` reports (:meth:`streams.sink.host.SinkHost.health`)."""
    state = sink.get("state", "off")
    if state == "elsewhere":
        return f"held by {sink.get('owner_role')} pid {sink.get('owner_pid')} (this worker decides without it)"
    if state in ("off", "opening"):
        return state + (f": {sink['last_error']}" if sink.get("last_error") else "")
    lag = sum(p["lag"] or 0 for p in sink.get("partitions", []))
    line = f"{state}, {sink['rows_written']:,} rows written, lag {lag:,} records, {sink['retries']} failed flushes"
    if state == "retrying":
        line += f" (failing for {sink['failing_for_s']:.0f}s: {sink['last_error']})"
    return line


@app.command()
def worker(
    ctx: typer.Context,
    web_port: Annotated[int | None, typer.Option(help="Port of the query/health endpoint.")] = None,
    loglevel: Annotated[str, typer.Option(help="Faust log level.")] = "info",
) -> None:
    """Run a Faust worker: budgets, decisions, dead letters, the Redis projection, and (CTXFLOW_SINK=auto|on|off)
    the ClickHouse sink in a thread of its own; makes missing topics."""
    from ctxflow.streams.runtime.worker import run_worker
    from ctxflow.streams.sink.ownership import BackendHeld

    settings = settings_of(ctx)
    if web_port is not None:
        settings = settings.model_copy(update={"web_port": web_port})
    # Left to Faust and the broker, the inputs would be created without their cleanup policy (a manifests topic
    # that deletes instead of compacting) and the outputs with the broker's default partition count.
    ensure_topics_or_exit(settings, "worker", console)
    try:
        run_worker(settings, loglevel)
    except BackendHeld as err:
        console.print(f"ctxflow worker cannot start with CTXFLOW_SINK=on: {err}. Use CTXFLOW_SINK=auto (decide without "
                      "the sink while another process holds it) or off.", style="red")
        raise typer.Exit(1) from err


@app.command()
def query(
    ctx: typer.Context,
    sql: Annotated[str, typer.Argument(help="A read-only ClickHouse SELECT; tables de-duplicate automatically.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Run an analyst query: through the running worker when there is one, else on chDB directly."""
    from ctxflow.streams.stack.query import QueryFailed, run_query

    try:
        result = run_query(settings_of(ctx), sql)
    except QueryFailed as error:
        console.print(str(error), style="red")
        raise typer.Exit(1) from error
    if as_json:
        console.print_json(data=result.as_json())
        return
    table = Table(*result.columns)
    for row in result.rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    console.print(table)


@app.command()
def demo(
    ctx: typer.Context,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of traffic to publish.")] = 60.0,
    rate: Annotated[float, typer.Option(min=1, help="Target events per second.")] = 1000.0,
) -> None:
    """Unattended demo: fresh stack under <home>/demo, a worker, multi-tenant traffic, then a report."""
    from ctxflow.streams.demo.run import run_demo

    raise typer.Exit(run_demo(settings_of(ctx), duration_s=duration, rate=rate))


@app.command()
def bench(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(min=1000, help="TurnEvents in the throughput corpus.")] = 200_000,
    runs_for_memory: Annotated[int, typer.Option(min=1000, help="Active runs for the memory phase.")] = 100_000,
    batch_max: Annotated[int | None, typer.Option(help="Worker batch size (default: the configured one).")] = None,
    partitions: Annotated[int, typer.Option(
        min=1, help="Partitions per topic of the benchmark's one-worker deployment; the half-rate latency is also "
        "measured on the configured count (CTXFLOW_PARTITIONS) when it differs.")] = 1,
    quick: Annotated[bool, typer.Option(help="Small smoke run (~1 minute); overrides the sizes.")] = False,
    output: Annotated[Path, typer.Option(help="Where to write the results JSON.")] = Path("bench-results.json"),
) -> None:
    """Benchmark on a private embedded stack: raw decode ceiling, worker rate, ClickHouse sink rate, latency, memory,
    recovery."""
    from ctxflow.streams.bench import BenchConfig, run_bench, verdicts

    settings = settings_of(ctx)
    if batch_max is not None:
        settings = settings.model_copy(update={"batch_max": batch_max})
    config = BenchConfig.quick() if quick else BenchConfig(events=events, runs_for_memory=runs_for_memory)
    config = dataclasses.replace(config, partitions=partitions)
    results = run_bench(settings, config, console.print)
    results.write(output)
    table = Table("metric", "measured", "target", "met")
    for metric, value, target, met in verdicts(results):
        table.add_row(metric, value, target, "yes" if met else "NO")
    table.add_row("raw_ceiling_eps (fetch + decode only)", f"{results.raw_ceiling_eps:,.0f}", "", "")
    table.add_row("ratio pipeline / raw", f"{results.ratio:.2f}", "", "")
    table.add_row("p50_latency_ms", f"{results.p50_latency_ms:.1f}", "", "")
    quarter = results.details.get("quarter_rate_p99_latency_ms")
    if quarter is not None:
        table.add_row("p99_latency_ms at a quarter of the pipeline rate", f"{quarter:.1f}", "", "")
    compared = results.details.get("compared_partitions_p99_latency_ms")
    if compared is not None:
        count = results.details["compared_partitions"]
        table.add_row(f"p99_latency_ms at half the rate with {count} partitions per topic", f"{compared:.1f}", "", "")
    table.add_row("sessions_rss_bytes_per_run", f"{results.sessions_rss_bytes_per_run:,.0f}", "", "")
    table.add_row("recovery_s", f"{results.recovery_s:.1f}", "", "")
    d = results.details
    table.add_row(f"after {d['retired_runs']:,} retired runs: RSS MiB, restart s (empty worker)",
                  f"{d['retired_runs_rss_bytes'] / 2**20:,.0f} ({d['retired_runs_empty_rss_bytes'] / 2**20:,.0f}), "
                  f"{d['retired_runs_restart_s']:.1f} ({d['retired_runs_empty_restart_s']:.1f})", "", "")
    if results.planner_chain_eps:
        table.add_row("planner table: changelog bytes per run of 40 items",
                      f"{d['eviction_changelog_bytes_per_run']:,}", "", "")
        table.add_row("planner CPU per record with an eviction decision, p50 / p99 (us)",
                      f"{results.planner_p50_us:,.0f} / {results.planner_p99_us:,.0f}", "", "")
        table.add_row("records per CPU second: processor chain / budget alone",
                      f"{results.planner_chain_eps:,.0f} / {d['planner_budget_only_eps']:,}", "", "")
        table.add_row("summarizer items per CPU second (~300-token tool outputs)",
                      f"{results.summarizer_items_per_cpu_s:,.0f}", "", "")
    table.add_row("ClickHouse sink alone: rows per CPU second of its process", f"{results.sink_rows_per_cpu_s:,.0f}",
                  "", "")
    probes = results.details.get("cpu_probe_ms", {})
    speeds = " / ".join(f"{probes[phase]:.0f}" for phase in ("start", "pipeline", "latency", "end") if phase in probes)
    table.add_row("cpu_probe_ms (machine speed, lower is faster: start, pipeline, latency, end)", speeds, "", "")
    console.print(table)
    console.print(f"results in {output} (git {results.git_sha})")


@app.command()
def soak(
    ctx: typer.Context,
    minutes: Annotated[float, typer.Option(min=0.1, help="How long to publish, in reporting periods.")] = 30.0,
    rate: Annotated[float, typer.Option(min=1, help="Target events per second.")] = 1500.0,
    kill_worker_at: Annotated[float | None, typer.Option(
        help="SIGKILL the worker this many periods in and start another; the totals must not change.")] = None,
    interval_s: Annotated[float, typer.Option(min=1, help="Seconds per reporting period (one line each).")] = 60.0,
    lag_limit_s: Annotated[float, typer.Option(min=0, help="Lag the target allows, in seconds.")] = 5.0,
    output: Annotated[Path, typer.Option(help="Where to write the results JSON.")] = Path("soak-results.json"),
) -> None:
    """Soak: the demo's workload through a worker on a private stack under <home>/soak, a line per minute; exit 1
    when lag exceeded the limit or anything published was not committed."""
    from ctxflow.streams.bench.soak import SoakConfig, soak_main

    config = SoakConfig(minutes=minutes, rate_eps=rate, interval_s=interval_s, kill_worker_at=kill_worker_at,
                        lag_limit_s=lag_limit_s)
    raise typer.Exit(soak_main(settings_of(ctx), config, output, console.print))


#: Subcommand groups owned by other modules: ``{"tenants": "ctxflow.streams.cli.tenants:app"}`` adds
#: ``ctxflow tenants ...``; they take ``settings_of`` from ``streams.cli.context``.
SUBCOMMAND_GROUPS: dict[str, str] = {
    "tenants": "ctxflow.streams.cli.tenants:app",
    "memory": "ctxflow.streams.cli.memory:app",
    "topics": "ctxflow.streams.cli.tenants:topics_app",
}

#: Commands owned by other modules, registered the same way: ``{"simulate": "module:function"}``.
SUBCOMMANDS: dict[str, str] = {
    "summarizer": "ctxflow.streams.cli.summarizer:summarizer",
    "sink": "ctxflow.streams.cli.sink:sink",
    "simulate": "ctxflow.streams.cli.simulate:simulate",
    "bench-quality": "ctxflow.streams.cli.simulate:bench_quality",
    "report": "ctxflow.streams.cli.report:report",
    "migrate": "ctxflow.streams.cli.migrate:migrate",
}

for _name, _target in SUBCOMMAND_GROUPS.items():
    _module, _, _attr = _target.partition(":")
    app.add_typer(getattr(importlib.import_module(_module), _attr), name=_name)
for _name, _target in SUBCOMMANDS.items():
    _module, _, _attr = _target.partition(":")
    app.command(name=_name)(getattr(importlib.import_module(_module), _attr))

#: Commands that join a group whichever module owns it (``{"memory": "module:register"}``, ``register(group)``
#: adding them); a group no module owns yet is created bare.
GROUP_MEMBERS: dict[str, str] = {
    "memory": "ctxflow.streams.cli.memory_store:register",  # rehydrate, pin, unpin
}

for _name, _target in GROUP_MEMBERS.items():
    _group = next((g.typer_instance for g in app.registered_groups if g.name == _name), None)
    if _group is None:
        _group = typer.Typer(help=f"ctxflow {_name} commands.", no_args_is_help=True, add_completion=False)
        app.add_typer(_group, name=_name)
    _module, _, _attr = _target.partition(":")
    getattr(importlib.import_module(_module), _attr)(_group)


def main() -> None:
    """Console-script entry point (``ctxflow``)."""
    app()


__all__ = ["app", "main", "settings_of"]


if __name__ == "__main__":
    main()
