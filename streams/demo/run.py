"""``ctxflow demo``: about a minute of multi-tenant agent traffic through the real pipeline, then a report.

Guarantees: a fresh home (``<home>/demo``) and a stack on free loopback ports (Tansu broker, redis-server,
chDB) with a real ``ctxflow worker`` process and a summarizer worker process beside it (compression jobs in,
summaries out, its own consumer group); all of them are stopped before :func:`run_demo` returns, on success,
error, Ctrl-C or SIGTERM (attached children also die if this process is SIGKILLed). The traffic is the eviction
workload (:class:`~streams.demo.workload.Workload` with ``eviction=True``): tenants on several strategies, long
sessions and a runaway loop that the planner relieves. The report is read back from ClickHouse through the
worker once everything is settled: the worker's committed offsets reached the end of every input, then the
summarizer's reached the end of the compression jobs, then the worker's again (the summaries it produced), so it
shows what was durably processed, not what was sent. The chDB directory stays on disk afterwards for
``CTXFLOW_HOME=<home>/demo ctxflow query ...``. Exit status: 0 success, 1 failure (the message names the log
to read), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import BudgetState, Decision, DecisionKind
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.harness import CommittedLag, FairClient, HomeInUse, claim_home, private_settings
from ctxflow.streams.demo.memory_scene import MemoryScene
from ctxflow.streams.demo.report import DemoReport, print_analyst_report
from ctxflow.streams.demo.workload import DriveProgress, Workload, drive
from ctxflow.streams.logs import LogfmtFormatter
from ctxflow.streams.runtime.stop_deadline import StopDeadline
from ctxflow.streams.sdk import BrokerUnavailable, CtxflowClient, PublishFailed
from ctxflow.streams.stack.admin import ensure_topics
from ctxflow.streams.stack.embedded import EmbeddedStack, StackStartError
from ctxflow.streams.stack.processes import pid_alive
from ctxflow.streams.stack.query import QueryFailed, run_query
from ctxflow.streams.stack.summarizer_process import SummarizerNotReady, SummarizerProcess
from ctxflow.streams.stack.worker_process import WorkerNotReady, WorkerProcess
from ctxflow.streams.summarizer.worker import summarizer_group
from ctxflow.streams.topics import COMPRESSION_JOBS, DEAD_LETTERS, DECISIONS
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

__all__ = ["DEFAULT_DURATION_S", "DEFAULT_RATE_EPS", "DEMO_TENANTS", "DemoFailed", "demo_workload", "run_demo"]

log = logging.getLogger(__name__)
DEFAULT_DURATION_S = 60.0
#: On the 2-core dev box, shared with other jobs: at 1000/s the worker stays within ~4k records; at 1500/s it
#: kept up when the box was quiet (lag up to ~7k) but once needed 52 s after publishing to catch up.
DEFAULT_RATE_EPS = 800.0
DEMO_SEED = 7
DEMO_TENANTS = 6
DEMO_SESSIONS = 4  # per tenant; few enough that the runaway and long sessions reach their watermarks in a short run
#: Seconds the demo's tasks get to wind down once interrupted, before they are abandoned (see _run_cancellable).
_CANCEL_GRACE_S = 1.0
#: The summarizer's graceful stop: what it has not committed is summarized again by the next one, with the same ids,
#: so it gets less time than the worker, which then still has its own graceful stop within the 8 s stop deadline.
_SUMMARIZER_GRACE_S = 2.0
#: Decisions of these kinds are kept whole for the report's examples (the summarizer's name and the summary's text
#: are on the topic, not in ClickHouse); at most this many of each.
_KEPT = {DecisionKind.SWAP: 500, DecisionKind.RECALL: 2_000}
_RELIEF_KINDS = ("evict", "mask", "compress", "swap", "offload", "recall")
_T = TypeVar("_T")


class DemoFailed(Exception):
    """The demo could not finish; ``log_path`` is the log that explains why."""

    def __init__(self, message: str, log_path: Path) -> None:
        super().__init__(message)
        self.log_path = log_path


def demo_workload() -> Workload:
    """The demo's traffic: six tenants (enterprise/standard/free, one no_retention) on several eviction strategies,
    one runaway, two long sessions (see :mod:`streams.demo.workload`)."""
    return Workload(DEMO_SEED, tenants=DEMO_TENANTS, sessions_per_tenant=DEMO_SESSIONS, eviction=True)


def _context_gauge(slot: object, reason: str) -> bool:
    """A slot or total-context gauge, not a consumption cap (run, workflow, spend window). Decision has no
    gauge field, so the reason's wording decides; the report (:mod:`streams.demo.report`) applies it in SQL."""
    return slot is not None or reason.startswith("total context")


@dataclass
class _Progress:
    """What the live display shows; written by the watcher tasks, read by the ticker (one event loop)."""

    duration_s: float
    rate: float
    runaway: str
    phase: str = "publishing"
    sent: DriveProgress = field(default_factory=lambda: DriveProgress(0, 0.0, 0.0))
    lag: int | None = None
    lag_measured_at: float = 0.0
    worker_eps: float = 0.0
    decisions: Counter[str] = field(default_factory=Counter)
    context_hard: Counter[str] = field(default_factory=Counter)
    cap_hard: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    poison_sent: int = 0
    #: Swap and recall decisions as published (see _KEPT), for the report's examples.
    kept: dict[DecisionKind, list[Decision]] = field(default_factory=lambda: {kind: [] for kind in _KEPT})

    def published(self, sent: DriveProgress) -> None:
        self.sent = sent

    def count(self, decision: Decision) -> None:
        kind = decision.kind.value
        if kind == "budget_state" and decision.state is not None:
            kind = f"-> {decision.state.value}"
            if decision.state.value == "hard":
                hard = self.context_hard if _context_gauge(decision.slot, decision.reason) else self.cap_hard
                hard[decision.tenant_id] += 1
            elif (decision.state is BudgetState.OK and decision.previous_state is not BudgetState.OK
                  and _context_gauge(decision.slot, decision.reason)):
                kind = "relief"  # a context gauge comes down only when the planner freed tokens
        kept = self.kept.get(decision.kind)
        if kept is not None and len(kept) < _KEPT[decision.kind]:
            kept.append(decision)
        self.decisions[kind] += 1

    def render(self) -> RenderableType:
        d, lag = self.decisions, "?" if self.lag is None else f"{self.lag:,}"
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        done = min(self.sent.elapsed_s, self.duration_s)
        grid.add_row(self.phase, ProgressBar(total=self.duration_s, completed=done, width=40))
        grid.add_row("published", f"{self.sent.sent:,} events, {self.sent.rate_eps:,.0f}/s "
                                  f"(target {self.rate:,.0f}/s)")
        grid.add_row("worker", f"lag {lag} records, committing {self.worker_eps:,.0f} events/s")
        grid.add_row("decisions", f"{sum(d.values()):,}: soft {d['-> soft']:,}, back to ok {d['relief']:,}, "
                                  f"hard {d['-> hard']:,}, rejections {d['rejection']:,}, spend exhausted "
                                  f"{d['spend_exhausted']:,}, reconciled {d['usage_reconciled']:,}")
        grid.add_row("relief", ", ".join(f"{kind} {d[kind]:,}" for kind in _RELIEF_KINDS))
        others = sum(n for t, n in self.context_hard.items() if t != self.runaway)
        own_caps = sum(n for t, n in self.cap_hard.items() if t != self.runaway)
        grid.add_row("hard limits", f"runaway {self.runaway}: {self.context_hard[self.runaway]} context, "
                                    f"{self.cap_hard[self.runaway]} run/workflow/window caps; other tenants: "
                                    f"{others} context, {own_caps} own caps")
        grid.add_row("dead letters", f"{self.dead_letters} (poison records sent: {self.poison_sent})")
        return Panel(grid, title="ctxflow demo", expand=False)


def _fresh_home(home: Path) -> None:
    """Empty ``home`` for a new run, refusing if another demo runs there or it is not a demo directory."""
    try:
        claim_home(home, "demo")
    except HomeInUse as busy:
        raise DemoFailed(str(busy), home / "logs" / "demo.log") from busy


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Send this process's logging to ``path`` while the live display owns the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root, handler = logging.getLogger(), logging.FileHandler(path)
    handler.setFormatter(LogfmtFormatter())
    saved, level = root.handlers[:], root.level
    root.handlers, root.level = [handler], min(root.level, logging.INFO)
    try:
        yield
    finally:
        root.handlers, root.level = saved, level
        handler.close()


class _ChildDied(Exception):
    """A worker or summarizer process exited during the demo (``name``: whose log explains it)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the {name} process exited during the demo")
        self.name = name


async def _watch_lag(settings: Settings, children: dict[str, int], progress: _Progress) -> None:
    """Worker lag from committed offsets (what is durable), and its commit rate; fails if a child process dies."""
    last: tuple[float, int] | None = None
    logged = 0
    async with CommittedLag(settings) as lag:
        while True:
            for name, pid in children.items():
                if not pid_alive(pid):
                    raise _ChildDied(name)
            sample = await lag.sample()
            measured_at = sample.measured_at
            progress.lag, progress.lag_measured_at = sample.records, measured_at
            total = sample.committed_total
            if last is not None and measured_at > last[0]:
                progress.worker_eps = (total - last[1]) / (measured_at - last[0])
            last = (measured_at, total)
            if int(measured_at) % 5 == 0 and int(measured_at) != logged:  # a trace for tuning --rate
                logged = int(measured_at)
                log.info("progress", extra={"sent": progress.sent.sent, "sent_eps": round(progress.sent.rate_eps),
                                            "lag": progress.lag, "committing_eps": round(progress.worker_eps)})
            await asyncio.sleep(0.5)


async def _watch_outputs(settings: Settings, progress: _Progress) -> None:
    """Count decisions (by kind) and dead letters as the worker publishes them."""
    codec, dead = Codec(), settings.topic(DEAD_LETTERS.name)
    consumer = AIOKafkaConsumer(settings.topic(DECISIONS.name), dead, bootstrap_servers=settings.bootstrap,
                                group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        while True:
            for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                if tp.topic == dead:
                    progress.dead_letters += len(records)
                    continue
                for record in records:
                    progress.count(codec.decode(record.value, Decision))
    finally:
        await consumer.stop()


async def _send_poison(client: CtxflowClient, settings: Settings, workload: Workload, progress: _Progress) -> None:
    poison = workload.poison_records()
    for record in poison:
        # Paced across the run (not waiting for anything) so dead letters appear while traffic flows.
        await asyncio.sleep(progress.duration_s / (len(poison) + 1))
        await client.send_raw(settings.topic(record.topic.name), record.key, record.value)
        progress.poison_sent += 1


async def _ticker(live: Live, progress: _Progress) -> None:
    while True:
        live.update(progress.render(), refresh=True)
        await asyncio.sleep(0.25)


async def _publish(settings: Settings, children: dict[str, int], workload: Workload, progress: _Progress,
                   console: Console, catch_up_s: float) -> DriveProgress:
    """Drive the workload under a live display, then wait until the worker has committed all of it."""
    try:
        with Live(progress.render(), console=console, auto_refresh=False, transient=False) as live:
            try:
                return await _drive_and_catch_up(settings, children, workload, progress, live, catch_up_s)
            finally:
                live.update(progress.render(), refresh=True)
    finally:
        console.line()  # in a pipe Live prints its last frame without a line end


async def _publish_records(settings: Settings, records: list[BaseModel]) -> None:
    """Publish a scripted act's records in order (one tenant: one partition, so the worker reads them in order)."""
    async with CtxflowClient(settings.bootstrap, topic_prefix=settings.topic_prefix,
                             registry_url=settings.schema_registry_url) as client:
        for record in records:
            await client.publish(record)


async def _drive_and_catch_up(settings: Settings, children: dict[str, int], workload: Workload, progress: _Progress,
                              live: Live, catch_up_s: float) -> DriveProgress:
    async with FairClient.from_settings(settings) as client, asyncio.TaskGroup() as group:
        watchers = [group.create_task(_watch_lag(settings, children, progress)),
                    group.create_task(_watch_outputs(settings, progress)),
                    group.create_task(_ticker(live, progress))]
        poison = group.create_task(_send_poison(client, settings, workload, progress))
        sent = await drive(client, workload, progress.rate, progress.duration_s, progress.published)
        await poison
        await client.flush()
        await _caught_up(progress, catch_up_s, settings.home / "logs" / "worker.log")
        for task in watchers:
            task.cancel()
    return sent


async def _caught_up(progress: _Progress, timeout_s: float, worker_log: Path) -> None:
    """Until a lag measurement taken after the last publish is zero: everything sent is durable."""
    progress.phase, flushed_at = "catching up", time.monotonic()
    while progress.lag != 0 or progress.lag_measured_at < flushed_at:
        if time.monotonic() > flushed_at + timeout_s:
            raise DemoFailed(f"the worker is still {progress.lag:,} records behind {timeout_s:.0f}s after "
                             "publishing ended; lower --rate", worker_log)
        await asyncio.sleep(0.1)
    progress.phase = "caught up"


async def _summarized(settings: Settings, timeout_s: float) -> None:
    """Until the summarizers' committed offsets reach the end of the compression jobs: every summary asked for
    is on the summaries topic (the worker's next catch-up takes them in)."""
    log_path = settings.home / "logs" / "summarizer.log"
    deadline = time.monotonic() + timeout_s
    async with CommittedLag(settings, summarizer_group(settings), (COMPRESSION_JOBS.name,)) as lag:
        while (behind := (await lag.sample()).records) > 0:
            if time.monotonic() > deadline:
                raise DemoFailed(f"the summarizer is still {behind:,} compression jobs behind {timeout_s:.0f}s after "
                                 "the worker caught up", log_path)
            await asyncio.sleep(0.1)


def _unwrap(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _explain(error: BaseException, logs: Path) -> DemoFailed:
    """The message and the log a user should read for ``error``."""
    error = _unwrap(error)
    if isinstance(error, DemoFailed):
        return error
    if isinstance(error, StackStartError):
        server = "redis" if str(error).startswith("redis") else "broker"
        return DemoFailed(f"the embedded stack did not start: {error}", logs / f"{server}.log")
    if isinstance(error, _ChildDied):
        return DemoFailed(str(error), logs / f"{error.name}.log")
    if isinstance(error, SummarizerNotReady):
        return DemoFailed(f"the summarizer failed: {error}", logs / "summarizer.log")
    if isinstance(error, WorkerNotReady | QueryFailed):
        return DemoFailed(f"the worker failed: {error}", logs / "worker.log")
    if isinstance(error, BrokerUnavailable | PublishFailed | KafkaError):
        return DemoFailed(f"publishing to the broker failed: {error}", logs / "broker.log")
    log.error("demo failed", exc_info=error)
    return DemoFailed(f"{type(error).__name__}: {error}", logs / "demo.log")


def run_demo(settings: Settings, *, duration_s: float = DEFAULT_DURATION_S, rate: float = DEFAULT_RATE_EPS,
             console: Console | None = None) -> int:
    """Run the whole demo and print its report; returns the process exit status (0, 1 or 130)."""
    # Piped output (make demo | tee, CI logs) has no terminal width: rich would wrap every table at 80 columns.
    console = console or Console(markup=False, highlight=False, width=None if sys.stdout.isatty() else 160)
    began = time.monotonic()
    # Self-contained on purpose: the report and the hint at the end are about this run's chDB.
    settings = private_settings(settings, "demo")
    shown_home = settings.home  # as the user typed it, for the copy-pasteable hints
    logs = settings.home.resolve() / "logs"
    restore_signals = _stop_on_signals(StopDeadline(
        "ctxflow demo", "its stack and worker are attached to it and die with it", exit_code=130))
    started: dict[str, int] = {}
    try:
        _fresh_home(settings.home)
        with _log_to(logs / "demo.log"), EmbeddedStack(settings) as stack:
            settings = stack.settings  # absolute home: the worker and chDB must agree on it
            ensure_topics(settings)
            started.update(stack.pids)
            console.print(f"stack up under {settings.home} (broker {settings.bootstrap}, redis "
                          f"{settings.redis_url}); starting the worker and the summarizer ...")
            with WorkerProcess(settings) as worker:
                started["worker"] = worker.pid
                console.print("processes: " + ", ".join(f"{n} pid {p}" for n, p in started.items()))
                summarizer = SummarizerProcess(settings).start()
                try:
                    started["summarizer"] = summarizer.pid
                    console.print(f"summarizer pid {summarizer.pid}: compression jobs in, summaries out (consumer "
                                  f"group {summarizer_group(settings)})")
                    workload = demo_workload()
                    runaway = workload.runaway_tenant
                    progress = _Progress(duration_s, rate, runaway.tenant_id if runaway else "-")
                    publish_began = time.monotonic()
                    sent = _run_cancellable(_publish(settings, {"worker": worker.pid, "summarizer": summarizer.pid},
                                                     workload, progress, console, catch_up_s=max(60.0, duration_s)))
                    worker.wait_caught_up(timeout_s=30.0)  # every compression job the traffic caused is asked for
                    _run_cancellable(_summarized(settings, timeout_s=30.0))
                    worker.wait_caught_up(timeout_s=30.0)  # authoritative: every published effect is durable
                    end_to_end_s = time.monotonic() - publish_began
                    memory = MemoryScene(workload.start)
                    for phase in memory.phases():
                        _run_cancellable(_publish_records(settings, phase))
                        worker.wait_caught_up(timeout_s=30.0)
                finally:
                    summarizer.stop(_SUMMARIZER_GRACE_S)
                report = DemoReport(worker, workload, console, shown_home, progress.kept)
                healthy = report.print_all()
                healthy &= memory.print_report(worker, console)
        console.print(f"stopped: {', '.join(f'{n} pid {p}' for n, p in started.items())}; "
                      f"still running: {[n for n, p in started.items() if pid_alive(p)] or 'none'}")
        _check_chdb_left(settings, console, report.turns)
        console.print(f"published {sent.sent:,} events in {sent.elapsed_s:.1f}s ({sent.rate_eps:,.0f} events/s); "
                      f"all durable after {end_to_end_s:.1f}s ({sent.sent / end_to_end_s:,.0f} events/s end to end); "
                      f"demo wall time {time.monotonic() - began:.1f}s")
        print_analyst_report(settings, workload.start, console, shown_home)
        return 0 if healthy else 1
    except BaseException as error:  # every way out becomes a message and an exit status
        if isinstance(_unwrap(error), KeyboardInterrupt):
            console.print(f"interrupted; stopped {', '.join(started) or 'nothing'} (logs in {logs})", style="yellow")
            return 130
        failed = _explain(error, logs)
        console.print(f"ctxflow demo failed: {failed}\nsee {failed.log_path} (all logs: {logs})", style="red")
        return 1
    finally:
        restore_signals()


def _stop_on_signals(deadline: StopDeadline) -> Callable[[], None]:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so cleanup runs as for Ctrl-C, and arm ``deadline``: the demo
    exits within it even if a child or the broker hangs. A second signal changes nothing (the deadline runs).
    Returns what puts the previous handlers back."""

    def on_signal(signum: int, frame: object) -> None:
        if not deadline.armed:
            deadline.arm(signal.Signals(signum).name)
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _run_cancellable(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)``, except that once interrupted its tasks get :data:`_CANCEL_GRACE_S` to wind down
    and are then abandoned: closing a consumer or producer waits on a broker that may never answer."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    except KeyboardInterrupt:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=_CANCEL_GRACE_S))
        for task in asyncio.all_tasks(loop):
            task._log_destroy_pending = False  # type: ignore[attr-defined]  (abandoned on purpose, not a bug)
        raise
    finally:
        if not asyncio.all_tasks(loop):  # an abandoned task may still hold the loop: leave it to the exit
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _check_chdb_left(settings: Settings, console: Console, turns: int) -> None:
    """Open the chDB left on disk as ``ctxflow query`` will (no worker answers now) and count the turns."""
    found = run_query(settings, "SELECT count() FROM turns").rows[0][0]
    if found != turns:
        raise DemoFailed(f"chDB at {settings.chdb_dsn} holds {found} turns after the demo, expected {turns}",
                         settings.home / "logs" / "worker.log")
    console.print(f"chDB left at {settings.chdb_dsn.removeprefix('chdb://')}: {found:,} turns readable without "
                  "a worker")
