"""``ctxflow demo``: about a minute of multi-tenant agent traffic through the real pipeline, then a report.

Guarantees: a fresh home (``<home>/demo``) and a stack on free loopback ports (Tansu broker, redis-server,
chDB) with a real ``ctxflow worker`` process; all of them are stopped before :func:`run_demo` returns, on
success, error, Ctrl-C or SIGTERM (attached children also die if this process is SIGKILLed). The report is
read back from ClickHouse through the worker after its committed offsets reached the end of every input,
so it shows what was durably processed, not what was sent. The chDB directory stays on disk afterwards for
``CTXFLOW_HOME=<home>/demo ctxflow query ...``. Exit status: 0 success, 1 failure (the message names the log
to read), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table

from processors.admission import AdmissionAnswer, check_admission
from processors.pricing import DEFAULT_PRICES
from schemas.codec import Codec
from schemas.models import Decision, Slot
from sinks.redis import read_headroom
from streams.admin import ensure_topics
from streams.config import Settings
from streams.log_end import log_end_offsets
from streams.logs import LogfmtFormatter
from streams.processes import free_port, pid_alive, start_time_of
from streams.query import QueryFailed, run_query
from streams.sdk import BrokerUnavailable, CtxflowClient, PublishFailed
from streams.stack import EmbeddedStack, StackStartError
from streams.topics import DEAD_LETTERS, DECISIONS
from streams.worker_process import INPUT_TOPICS, WorkerNotReady, WorkerProcess
from streams.workload import DriveProgress, Workload, drive

__all__ = ["DEFAULT_DURATION_S", "DEFAULT_RATE_EPS", "DEMO_TENANTS", "DemoFailed", "demo_workload", "run_demo"]

log = logging.getLogger(__name__)
DEFAULT_DURATION_S = 60.0
#: On the 2-core dev box, shared with other jobs: at 1000/s the worker stays within ~4k records; at 1500/s it
#: kept up when the box was quiet (lag up to ~7k) but once needed 52 s after publishing to catch up.
DEFAULT_RATE_EPS = 1000.0
DEMO_SEED = 7
DEMO_TENANTS = 6
DEMO_SESSIONS = 4  # per tenant; few enough that the runaway session reaches its hard limit in a short run
_MARKER = "demo.pid"


class DemoFailed(Exception):
    """The demo could not finish; ``log_path`` is the log that explains why."""

    def __init__(self, message: str, log_path: Path) -> None:
        super().__init__(message)
        self.log_path = log_path


def demo_workload() -> Workload:
    """The demo's traffic: six tenants (enterprise/standard/free, one no_retention), one runaway."""
    return Workload(DEMO_SEED, tenants=DEMO_TENANTS, sessions_per_tenant=DEMO_SESSIONS)


def _context_gauge(slot: object, reason: str) -> bool:
    """A slot or total-context gauge, not a consumption cap (run, workflow, spend window). Decision has no
    gauge field, so the reason's wording decides; ``_Report`` applies the same rule in SQL."""
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

    def published(self, sent: DriveProgress) -> None:
        self.sent = sent

    def count(self, decision: Decision) -> None:
        kind = decision.kind.value
        if kind == "budget_state" and decision.state is not None:
            kind = f"-> {decision.state.value}"
            if decision.state.value == "hard":
                hard = self.context_hard if _context_gauge(decision.slot, decision.reason) else self.cap_hard
                hard[decision.tenant_id] += 1
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
        grid.add_row("decisions", f"{sum(d.values()):,}: soft {d['-> soft']:,}, hard {d['-> hard']:,}, "
                                  f"rejections {d['rejection']:,}, spend exhausted {d['spend_exhausted']:,}, "
                                  f"evictions {d['eviction_request']:,}, reconciled {d['usage_reconciled']:,}")
        others = sum(n for t, n in self.context_hard.items() if t != self.runaway)
        own_caps = sum(n for t, n in self.cap_hard.items() if t != self.runaway)
        grid.add_row("hard limits", f"runaway {self.runaway}: {self.context_hard[self.runaway]} context, "
                                    f"{self.cap_hard[self.runaway]} run/workflow/window caps; other tenants: "
                                    f"{others} context, {own_caps} own caps")
        grid.add_row("dead letters", f"{self.dead_letters} (poison records sent: {self.poison_sent})")
        return Panel(grid, title="ctxflow demo", expand=False)


def _demo_settings(settings: Settings) -> Settings:
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    kafka, redis, web = sorted(ports)
    return settings.model_copy(update={
        "home": settings.home / "demo", "bootstrap": f"127.0.0.1:{kafka}",
        "redis_url": f"redis://127.0.0.1:{redis}/0", "web_port": web,
        # Self-contained on purpose: the report and the hint at the end are about this run's chDB.
        "clickhouse_dsn": None, "schema_registry_url": None,
    })


def _fresh_home(home: Path) -> None:
    """Empty ``home`` for a new run, refusing if another demo runs there or it is not a demo directory."""
    marker = home / _MARKER
    if marker.exists():
        pid, _, start = marker.read_text().partition(" ")
        if pid_alive(int(pid), int(start) if start.strip() else None):
            raise DemoFailed(f"another demo (pid {pid}) is running under {home}", home / "logs" / "demo.log")
        shutil.rmtree(home)
    elif home.exists() and any(home.iterdir()):
        raise DemoFailed(f"{home} exists and is not a demo directory; remove it or pick another --home", home)
    home.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()} {start_time_of(os.getpid()) or ''}")


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


class _WorkerDied(Exception):
    pass


class _FairClient(CtxflowClient):
    """A client that yields to the event loop every 200 records: aiokafka's send rarely suspends, so a
    publisher running behind its schedule would otherwise freeze the live display and the lag watcher."""

    _published = 0

    async def publish(self, record: BaseModel) -> None:
        await super().publish(record)
        self._published += 1
        if self._published % 200 == 0:
            await asyncio.sleep(0)


async def _watch_lag(settings: Settings, worker_pid: int, progress: _Progress) -> None:
    """Worker lag from committed offsets (what is durable), and its commit rate; fails if the worker dies."""
    tps = [TopicPartition(settings.topic(t), p) for t in INPUT_TOPICS for p in range(settings.partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await consumer.start()
    await admin.start()
    last: tuple[float, int] | None = None
    logged = 0
    try:
        while True:
            if not pid_alive(worker_pid):
                raise _WorkerDied("the worker process exited during the demo")
            measured_at = time.monotonic()
            ends = await log_end_offsets(consumer, tps)  # end_offsets alone under-reports the lag
            committed = await admin.list_consumer_group_offsets(settings.app_id, partitions=tps)
            done = {tp: max(0, m.offset) for tp, m in committed.items() if m is not None}
            progress.lag = sum(max(0, end - done.get(tp, 0)) for tp, end in ends.items())
            progress.lag_measured_at = measured_at
            total = sum(done.values())
            if last is not None and measured_at > last[0]:
                progress.worker_eps = (total - last[1]) / (measured_at - last[0])
            last = (measured_at, total)
            if int(measured_at) % 5 == 0 and int(measured_at) != logged:  # a trace for tuning --rate
                logged = int(measured_at)
                log.info("progress", extra={"sent": progress.sent.sent, "sent_eps": round(progress.sent.rate_eps),
                                            "lag": progress.lag, "committing_eps": round(progress.worker_eps)})
            await asyncio.sleep(0.5)
    finally:
        await admin.close()
        await consumer.stop()


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


async def _publish(settings: Settings, worker_pid: int, workload: Workload, progress: _Progress,
                   console: Console, catch_up_s: float) -> DriveProgress:
    """Drive the workload under a live display, then wait until the worker has committed all of it."""
    try:
        with Live(progress.render(), console=console, auto_refresh=False, transient=False) as live:
            try:
                return await _drive_and_catch_up(settings, worker_pid, workload, progress, live, catch_up_s)
            finally:
                live.update(progress.render(), refresh=True)
    finally:
        console.line()  # in a pipe Live prints its last frame without a line end


async def _drive_and_catch_up(settings: Settings, worker_pid: int, workload: Workload, progress: _Progress,
                              live: Live, catch_up_s: float) -> DriveProgress:
    async with _FairClient.from_settings(settings) as client, asyncio.TaskGroup() as group:
        watchers = [group.create_task(_watch_lag(settings, worker_pid, progress)),
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
    if isinstance(error, WorkerNotReady | _WorkerDied | QueryFailed):
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
    settings = _demo_settings(settings)
    shown_home = settings.home  # as the user typed it, for the copy-pasteable hints
    logs = settings.home.resolve() / "logs"
    # SIGTERM becomes SIGINT, so asyncio cancels the main task cleanly and cleanup runs as for Ctrl-C.
    previous_term = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    started: dict[str, int] = {}
    try:
        _fresh_home(settings.home)
        with _log_to(logs / "demo.log"), EmbeddedStack(settings) as stack:
            settings = stack.settings  # absolute home: the worker and chDB must agree on it
            ensure_topics(settings)
            started.update(stack.pids)
            console.print(f"stack up under {settings.home} (broker {settings.bootstrap}, redis "
                          f"{settings.redis_url}); starting the worker ...")
            with WorkerProcess(settings) as worker:
                started["worker"] = worker.pid
                console.print("processes: " + ", ".join(f"{n} pid {p}" for n, p in started.items()))
                workload = demo_workload()
                runaway = workload.runaway_tenant
                progress = _Progress(duration_s, rate, runaway.tenant_id if runaway else "-")
                publish_began = time.monotonic()
                sent = asyncio.run(_publish(settings, worker.pid, workload, progress, console,
                                            catch_up_s=max(60.0, duration_s)))
                worker.wait_caught_up(timeout_s=30.0)  # authoritative: every published effect is durable
                end_to_end_s = time.monotonic() - publish_began
                report = _Report(worker, workload, console, shown_home)
                healthy = report.print_all()
        console.print(f"stopped: {', '.join(f'{n} pid {p}' for n, p in started.items())}; "
                      f"still running: {[n for n, p in started.items() if pid_alive(p)] or 'none'}")
        _check_chdb_left(settings, console, report.turns)
        console.print(f"published {sent.sent:,} events in {sent.elapsed_s:.1f}s ({sent.rate_eps:,.0f} events/s); "
                      f"all durable after {end_to_end_s:.1f}s ({sent.sent / end_to_end_s:,.0f} events/s end to end); "
                      f"demo wall time {time.monotonic() - began:.1f}s")
        return 0 if healthy else 1
    except BaseException as error:  # every way out becomes a message and an exit status
        if isinstance(_unwrap(error), KeyboardInterrupt):
            console.print(f"interrupted; stopped {', '.join(started) or 'nothing'} (logs in {logs})", style="yellow")
            return 130
        failed = _explain(error, logs)
        console.print(f"ctxflow demo failed: {failed}\nsee {failed.log_path} (all logs: {logs})", style="red")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def _check_chdb_left(settings: Settings, console: Console, turns: int) -> None:
    """Open the chDB left on disk as ``ctxflow query`` will (no worker answers now) and count the turns."""
    found = run_query(settings, "SELECT count() FROM turns").rows[0][0]
    if found != turns:
        raise DemoFailed(f"chDB at {settings.chdb_dsn} holds {found} turns after the demo, expected {turns}",
                         settings.home / "logs" / "worker.log")
    console.print(f"chDB left at {settings.chdb_dsn.removeprefix('chdb://')}: {found:,} turns readable without "
                  "a worker")


_SLOTS = tuple(slot.value for slot in Slot)
#: What an agent of each checked run plans to add before its next call (slot -> tokens).
_PLAN = {Slot.HISTORY: 800, Slot.RETRIEVED: 600, Slot.OUTPUT: 500}
_BUDGET_KINDS = "('budget_state', 'rejection', 'spend_exhausted')"
_SHOWN_TRANSITIONS = 14


def _n(value: int | str | None) -> str:
    return f"{int(value or 0):,}"


class _Report:
    """The end-of-demo report, every number read from ClickHouse through the running worker."""

    def __init__(self, worker: WorkerProcess, workload: Workload, console: Console, shown_home: Path) -> None:
        self.worker, self.console, self.shown_home = worker, console, shown_home
        self.tenants = workload.tenants
        self.runaway = workload.runaway_tenant.tenant_id if workload.runaway_tenant else ""
        self.turns = 0

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.worker.query(sql).rows

    def print_all(self) -> bool:
        """Print every section; False when an invariant the demo shows (privacy) is broken."""
        budget = self._per_tenant()
        self._runaway_section(budget)
        self._dead_letters()
        private = self._privacy()
        self._admission(budget)
        self._next_steps()
        return private

    def _per_tenant(self) -> dict[str, tuple[int, ...]]:
        runs = {r[0]: r[1:] for r in self.rows(
            "SELECT tenant_id, countIf(phase = 'started'), countIf(phase = 'started' AND parent_run_id IS NOT NULL) "
            "FROM runs GROUP BY tenant_id")}
        slots: dict[str, Counter[str]] = {t.tenant_id: Counter() for t in self.tenants}
        turns: Counter[str] = Counter()
        for tenant, slot, count, tokens in self.rows(
                "SELECT tenant_id, slot, count(), sum(token_count) FROM turns GROUP BY tenant_id, slot"):
            slots.setdefault(tenant, Counter())[slot] += int(tokens or 0)
            turns[tenant] += int(count)
        self.turns = sum(turns.values())
        usage: Counter[str] = Counter()
        cost: Counter[str] = Counter()
        guessed: set[str] = set()
        for tenant, model, *kinds in self.rows(
                "SELECT tenant_id, model, sum(input_tokens), sum(output_tokens), sum(cached_read_tokens), "
                "sum(cache_write_tokens), sum(reasoning_tokens) FROM usage GROUP BY tenant_id, model"):
            price, estimated = DEFAULT_PRICES.price(model)
            per_mtok = (price.input, price.output, price.cached_read, price.cache_write, price.reasoning)
            usage[tenant] += sum(int(k) for k in kinds)
            cost[tenant] += sum(int(k) * p for k, p in zip(kinds, per_mtok, strict=True)) / 1e12
            if estimated:
                guessed.add(model)
        budget = {r[0]: r[1:] for r in self.rows(
            "SELECT tenant_id, countIf(kind = 'budget_state' AND state = 'soft' AND previous_state = 'ok'), "
            "countIf(kind = 'budget_state' AND state = 'hard'), countIf(kind = 'rejection'), "
            "countIf(kind = 'spend_exhausted'), countIf(kind = 'eviction_request'), "
            # the rule of _context_gauge
            "countIf(kind = 'budget_state' AND state = 'hard' AND (slot IS NOT NULL OR startsWith(reason, 'total "
            "context'))) FROM decisions GROUP BY tenant_id")}
        letters = dict(self.rows("SELECT tenant_id, count() FROM dead_letters GROUP BY tenant_id"))

        traffic = Table("tenant", "tier", "privacy", "runs", "sub-agent runs", "turns", "context tokens",
                        "usage tokens", "est. cost USD", title="Per tenant: traffic, tokens and cost")
        by_slot = Table("tenant", *_SLOTS, title="Per tenant: context tokens by slot")
        decided = Table("tenant", "soft watermark", "hard limit", "rejections", "spend exhausted", "evictions",
                        "dead letters", title="Per tenant: budget decisions")
        for t in self.tenants:
            name, (started, children) = t.tenant_id, runs.get(t.tenant_id, (0, 0))
            traffic.add_row(name, t.tier, "no_retention" if t.no_retention else "retained", _n(started),
                            _n(children), _n(turns[name]), _n(slots[name].total()), _n(usage[name]),
                            f"{cost[name]:,.2f}")
            by_slot.add_row(name, *(_n(slots[name][s]) for s in _SLOTS))
            decided.add_row(name, *(_n(v) for v in budget.get(name, (0,) * 6)[:5]), _n(letters.get(name, 0)))
        if letters.get(""):
            decided.add_row("(unreadable)", *("-",) * 5, _n(letters[""]))
        for table in (traffic, by_slot, decided):
            self.console.print(table)
        self.console.print(f"cost: {DEFAULT_PRICES.version} list prices"
                           + (f"; {', '.join(sorted(guessed))} priced at the fallback rate" if guessed else ""))
        return budget

    def _runaway_section(self, budget: dict[str, tuple[int, ...]]) -> None:
        # decided_at is the batch's wall clock (one value per batch): order by the source event's time instead.
        tenant = self.runaway
        sources = " UNION ALL ".join(f"SELECT event_id, occurred_at AS at FROM {table} WHERE tenant_id = '{tenant}'"
                                     for table in ("turns", "usage", "runs"))
        rows = self.rows(
            "SELECT toString(e.at), d.run_id, d.kind, d.previous_state, d.state, d.used_tokens, d.cap_tokens, "
            f"d.reason FROM decisions AS d LEFT JOIN ({sources}) AS e ON d.source_event_id = e.event_id "
            f"WHERE d.tenant_id = '{tenant}' AND d.kind IN {_BUDGET_KINDS} ORDER BY e.at, d.used_tokens, d.kind")
        table = Table("event time", "run", "decision", "used / cap", "reason",
                      title=f"Runaway tenant {tenant}: watermark and hard-limit transitions in event-time order")
        for at, run, kind, before, after, used, cap, reason in rows[:_SHOWN_TRANSITIONS]:
            what = f"{before} -> {after}" if kind == "budget_state" else kind
            table.add_row(at[11:23], run[:8], what, f"{_n(used)} / {_n(cap)}", reason)
        self.console.print(table)
        if len(rows) > _SHOWN_TRANSITIONS:
            self.console.print(f"... and {len(rows) - _SHOWN_TRANSITIONS} more (see the queries below)")
        _, hard, rejections, *_, context_hard = budget.get(tenant, (0,) * 6)
        self.console.print(f"runaway tenant {tenant} hit its hard limit {hard} times ({context_hard} on context "
                           f"slots or total, {rejections} rejections)", style="bold")
        others = [t.tenant_id for t in self.tenants if t.tenant_id != tenant]
        context = {t: budget[t][5] for t in others if t in budget and budget[t][5]}
        caps = {t: budget[t][1] - budget[t][5] for t in others if t in budget and budget[t][1] > budget[t][5]}
        if not context and not caps:
            self.console.print(f"other tenants ({', '.join(others)}): 0 hard-limit decisions, unaffected",
                               style="green")
        elif not context:
            self.console.print(f"other tenants ({', '.join(others)}): 0 context hard limits, unaffected by "
                               f"{tenant}; own run/workflow/window token caps reached: {caps}", style="yellow")
        else:
            self.console.print(f"other tenants with context hard limits: {context}", style="red")

    def _dead_letters(self) -> None:
        table = Table("tenant", "source", "offset", "reason code", "reason", title="Dead letters")
        for tenant, topic, partition, offset, code, reason in self.rows(
                "SELECT tenant_id, source_topic, source_partition, source_offset, reason_code, reason "
                "FROM dead_letters ORDER BY source_topic, source_offset"):
            table.add_row(tenant or "(unreadable)", f"{topic}[{partition}]", str(offset), code, reason)
        self.console.print(table)

    def _privacy(self) -> bool:
        private, leaked, kept = self.rows(
            "SELECT countIf(privacy = 'no_retention'), countIf(privacy = 'no_retention' AND content IS NOT NULL), "
            "countIf(privacy = 'retained' AND content IS NOT NULL) FROM turns")[0]
        ok = int(leaked) == 0
        self.console.print(
            f"privacy: {_n(private)} no_retention turns stored, {_n(leaked)} of them with content "
            f"({_n(kept)} retained turns keep theirs): {'OK' if ok else 'VIOLATED'}",
            style="green" if ok else "bold red")
        return ok

    def _admission(self, budget: dict[str, tuple[int, ...]]) -> None:
        runaway_run = self.rows(
            f"SELECT run_id FROM turns WHERE tenant_id = '{self.runaway}' GROUP BY run_id "
            "ORDER BY sum(token_count) DESC LIMIT 1")
        healthy = next((t.tenant_id for t in self.tenants
                        if t.tenant_id != self.runaway and not budget.get(t.tenant_id, (0, 0))[1]), None)
        healthy_run = self.rows(
            f"SELECT run_id FROM turns WHERE tenant_id = '{healthy}' GROUP BY run_id "
            "ORDER BY max(occurred_at) DESC LIMIT 1") if healthy else []
        checks = [(self.runaway, r[0]) for r in runaway_run] + [(str(healthy), r[0]) for r in healthy_run]
        plan = ", ".join(f"{slot.value} {tokens}" for slot, tokens in _PLAN.items())
        self.console.print(f"admission check from Redis (one GET per run), planning {plan} tokens:")
        for tenant, run, answer, ms in asyncio.run(_admit(self.worker.settings.redis_url, checks)):
            self.console.print(f"  {tenant} run {run[:8]}: {answer.reason} ({ms:.1f} ms)",
                               style="green" if answer.admitted else "red")

    def _next_steps(self) -> None:
        runaway = self.runaway
        queries = (
            "SELECT tenant_id, slot, sum(token_count) AS tokens FROM turns GROUP BY tenant_id, slot "
            "ORDER BY tenant_id, tokens DESC",
            f"SELECT decided_at, kind, state, reason FROM decisions WHERE tenant_id = '{runaway}' "
            "AND kind != 'usage_reconciled' ORDER BY decided_at LIMIT 20",
            "SELECT tenant_id, model, count() AS calls, sum(input_tokens + output_tokens) AS tokens, "
            "quantile(0.99)(latency_ms) AS p99_ms FROM usage GROUP BY tenant_id, model",
            "SELECT source_topic, source_offset, reason_code, reason FROM dead_letters",
        )
        self.console.print(
            "Next: query what the worker wrote. While a worker runs, `ctxflow query` goes through it (chDB "
            "allows one engine per process); this demo's worker has stopped, so these open the chDB it left:")
        for sql in queries:
            self.console.print(f'  CTXFLOW_HOME={self.shown_home} ctxflow query "{sql}"', soft_wrap=True)


async def _admit(url: str, checks: list[tuple[str, str]]) -> list[tuple[str, str, AdmissionAnswer, float]]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    answers = []
    try:
        for tenant, run in checks:
            began = time.perf_counter()
            headroom = await read_headroom(client, tenant, run)
            answers.append((tenant, run, check_admission(headroom, _PLAN), (time.perf_counter() - began) * 1000))
    finally:
        await client.aclose()
    return answers
