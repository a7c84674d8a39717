"""``ctxflow soak``: the demo's multi-tenant workload through one worker on a private embedded stack, for as
long as asked, reported every minute and judged against a lag limit and a complete commit.

Guarantees: a fresh home (``<home>/soak``) and a stack on free loopback ports with a real ``ctxflow worker``
child, as ``ctxflow demo`` runs them, all stopped before :func:`run_soak` returns. Every period (a minute
unless ``interval_s`` says otherwise) prints one line and appends a :class:`~streams.bench.soak_report.SoakMinute`
to the series:

* published: records this process queued on the worker's input topics (events, manifests, latency probes), as
  counted when queued; the final flush raises if the broker lost any;
* committed: the worker's committed consumer-group offsets, summed over every input partition (durable effects);
* lag: records not yet committed, and ``lag_s``, the age of the oldest of them (:mod:`streams.bench.record_age`:
  now minus its producer timestamp). Lag is sampled every ``sample_every_s`` (1 s), so ``max_lag_s`` is the
  maximum over all samples, the catch-up after publishing included; a sample that stalls (a wedged broker)
  counts its stall as lag;
* decision latency p99 of one admission probe per second (:mod:`streams.bench.decision_probe`);
* worker and broker RSS and CPU cores from ``/proc`` (:mod:`streams.bench.procstat`).

The workload is published from a thread of its own (:mod:`streams.bench.soak_publisher`), so a publisher that
keeps its event loop busy never delays a measurement.

At the end it waits (at most ``catch_up_s``) until everything published is committed, then checks the totals the
budget must hold against what was published (turn and usage counts and tokens per tenant in ClickHouse, read
through the worker, and each tenant's spend ledger as its changelog holds it). ``worker_rss_growth`` is the
worker's RSS at the end over its RSS at the end of the first period. ``kill_worker_at`` SIGKILLs the worker
that many periods in and starts another on the same settings (its changelogs restore its tables) while the
workload keeps publishing: the totals must come out the same, and lag is judged only before the kill (the
recovery after it is reported, not held to the limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiokafka.errors import KafkaError
from ctxflow.streams.bench.decision_probe import DecisionProbe
from ctxflow.streams.bench.procstat import CpuMeter, read_proc
from ctxflow.streams.bench.record_age import OldestRecordAge
from ctxflow.streams.bench.report import git_sha
from ctxflow.streams.bench.soak_publisher import CLOSE_S, Publisher
from ctxflow.streams.bench.soak_report import SoakMinute, SoakResults, minute_line, p99_ms
from ctxflow.streams.bench.soak_totals import totals_problems
from ctxflow.streams.bench.soak_workers import WorkerSuccession
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.harness import CommittedLag, HomeInUse, LagSample, claim_home, private_settings
from ctxflow.streams.demo.run import demo_workload
from ctxflow.streams.demo.workload import DriveProgress
from ctxflow.streams.sdk import BrokerUnavailable, CtxflowClient, PublishFailed
from ctxflow.streams.stack.admin import ensure_topics
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.processes import pid_alive
from ctxflow.streams.stack.query import QueryFailed
from ctxflow.streams.stack.worker_process import WorkerNotReady

__all__ = ["SoakConfig", "SoakFailed", "run_soak", "soak_main"]

_MB = 1024 * 1024


@dataclass(frozen=True)
class SoakConfig:
    """How long and how hard: ``minutes`` periods of ``interval_s`` seconds at ``rate_eps`` events per second."""

    minutes: float = 30.0
    rate_eps: float = 1500.0
    interval_s: float = 60.0
    kill_worker_at: float | None = None  # periods into the run
    lag_limit_s: float = 5.0
    sample_every_s: float = 1.0
    probe_every_s: float = 1.0
    catch_up_s: float = 300.0


class SoakFailed(Exception):
    """The soak could not run to its end; ``log_path`` is the log that explains why."""

    def __init__(self, message: str, log_path: Path) -> None:
        super().__init__(message)
        self.log_path = log_path


class _Soak:
    """One soak's measurements on a running stack and worker (one event loop)."""

    def __init__(self, settings: Settings, config: SoakConfig, workers: WorkerSuccession, broker_pid: int,
                 say: Callable[[str], None]) -> None:
        self.settings, self.config, self.workers, self.broker_pid, self.say = settings, config, workers, broker_pid, say
        self.cpu = {"worker": CpuMeter(), "broker": CpuMeter()}
        self.series: list[SoakMinute] = []
        self.latest: LagSample | None = None
        self.lag_s = self.max_lag_s = self.period_max_lag_s = 0.0
        self.period_max_lag_in: str | None = None
        self.max_lag_records = 0
        self.broke_at: float | None = None  # monotonic time of the first sample over the limit
        self.t0 = time.monotonic()
        self.restart_s: float | None = None

    @property
    def log(self) -> Path:
        return self.settings.home / "logs" / "worker.log"

    def period(self, at: float) -> int:
        return max(1, int((at - self.t0) // self.config.interval_s) + 1)

    async def run(self) -> SoakResults:
        workload = demo_workload()
        tenant = workload.tenants[0]
        duration_s = self.config.minutes * self.config.interval_s
        self.publisher = Publisher(self.settings, workload, self.config.rate_eps, duration_s, self.config.catch_up_s,
                                   self.say)
        self.probe = DecisionProbe(self.settings, tenant.tenant_id, tenant.users[0], tenant.model, workload.start)
        self.probes = CtxflowClient.from_settings(self.settings, linger_ms=0)
        clients = contextlib.AsyncExitStack()
        try:
            await self.probes.start()
            clients.push_async_callback(self.probes.stop)
            self.lag = await clients.enter_async_context(CommittedLag(self.settings))
            self.ages = await clients.enter_async_context(OldestRecordAge(self.settings))
            await clients.enter_async_context(self.probe)
            return await self._measure()
        finally:
            try:
                async with asyncio.timeout(CLOSE_S):
                    await clients.aclose()
            except TimeoutError:  # closing waits on a broker that may never answer; the process exits anyway
                self.say(f"the soak's Kafka clients did not close within {CLOSE_S:.0f}s; abandoned")

    @property
    def published(self) -> int:
        """Records this soak queued for the worker's input topics: the workload's and the probes."""
        return self.publisher.published + len(self.probe.sent)

    async def _measure(self) -> SoakResults:
        await self._sample()
        self.t0 = time.monotonic()
        caught_up_after: float | None = None
        async with asyncio.TaskGroup() as group:
            background = [group.create_task(self._every(self.config.sample_every_s, self._sample)),
                          group.create_task(self._every(0.0, self.probe.collect))]
            prober = group.create_task(self._every(self.config.probe_every_s, self._probe))
            reporter = group.create_task(self._report_periods())
            if self.config.kill_worker_at is not None:
                background.append(group.create_task(self._kill_at(self.config.kill_worker_at)))
            sent = await self.publisher.run()
            prober.cancel()  # a probe sent while catching up would always leave a record to commit
            await self.probes.flush(CLOSE_S)
            await reporter
            if sent is not None:
                caught_up_after = await self._catch_up()
            for task in background:
                task.cancel()
        truth = self.publisher.client.truth
        problems = None if caught_up_after is None else await totals_problems(self.workers.current, truth)
        return self._results(sent, caught_up_after, problems)

    async def _every(self, period_s: float, step: Callable[[], Awaitable[object]]) -> None:
        while True:
            began = time.monotonic()
            await step()
            await asyncio.sleep(max(0.0, period_s - (time.monotonic() - began)))

    async def _probe(self) -> None:
        await self.probe.send(self.probes)

    async def _sample(self) -> None:
        sample = await self.lag.sample()
        self.latest, self.lag_s = sample, await self.ages.measure(sample)
        held = self.ages.oldest_in
        where = None if held is None else f"{held.topic.removeprefix(self.settings.topic(''))}:{held.partition}"
        self._note_lag(self.lag_s, sample.records, sample.measured_at, where)
        self.cpu["worker"].add(read_proc(self.workers.current.pid))
        self.cpu["broker"].add(read_proc(self.broker_pid))
        if not self.workers.replacing and not pid_alive(self.workers.current.pid):
            raise SoakFailed("the worker process exited during the soak", self.log)

    def _note_lag(self, lag_s: float, records: int, at: float, where: str | None = None) -> None:
        if lag_s > self.period_max_lag_s:
            self.period_max_lag_s, self.period_max_lag_in = lag_s, where or self.period_max_lag_in
        if lag_s > self.max_lag_s:
            self.max_lag_s = lag_s
        self.max_lag_records = max(self.max_lag_records, records)
        if lag_s > self.config.lag_limit_s and self.broke_at is None:
            self.broke_at = at

    def _current_lag_s(self, now: float) -> float:
        """The last sample's lag, grown by the time since it was taken when records were waiting: a sampler
        stalled by the broker must not hide lag."""
        assert self.latest is not None
        stale = now - self.latest.measured_at
        lag_s = self.lag_s + stale if self.latest.records and stale > 2 * self.config.sample_every_s else self.lag_s
        self._note_lag(lag_s, self.latest.records, now)
        return lag_s

    async def _kill_at(self, periods: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + periods * self.config.interval_s - time.monotonic()))
        pid = self.workers.current.pid
        self.say(f"SIGKILL worker pid {pid} at {periods:g} periods; starting another on the same settings ...")
        self.restart_s = await self.workers.replace()
        self.say(f"worker pid {self.workers.current.pid} owns its partitions {self.restart_s:.1f}s after the kill")

    async def _report_periods(self) -> None:
        interval, previous = self.config.interval_s, None
        marks = {name: meter.total_s for name, meter in self.cpu.items()}
        for k in range(1, int(self.config.minutes + 0.999) + 1):
            end = self.t0 + min(k, self.config.minutes) * interval
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            now, sample = time.monotonic(), self.latest
            assert sample is not None
            lag_s = self._current_lag_s(now)
            latencies, probes, unanswered = self.probe.latencies(end - interval, end, now)
            span = interval if previous is None else now - previous[0]
            readings = {"worker": read_proc(self.workers.current.pid), "broker": read_proc(self.broker_pid)}
            cores = {name: (self.cpu[name].total_s - marks[name]) / max(span, 1e-9) for name in marks}
            marks = {name: meter.total_s for name, meter in self.cpu.items()}
            published, committed = self.published, sample.committed_total
            before = (0, 0) if previous is None else previous[1:]
            minute = SoakMinute(
                minute=k, elapsed_s=round(now - self.t0, 1), published=published,
                published_in_minute=published - before[0], committed=committed,
                committed_in_minute=committed - before[1], lag_records=sample.records, lag_s=round(lag_s, 2),
                max_lag_s=round(max(self.period_max_lag_s, lag_s), 2), max_lag_in=self.period_max_lag_in,
                p99_ms=p99_ms(latencies), probes=probes,
                unanswered=unanswered, worker_pid=self.workers.current.pid,
                worker_rss_mb=_mb(readings["worker"]), worker_cpu_cores=round(cores["worker"], 2),
                broker_rss_mb=_mb(readings["broker"]), broker_cpu_cores=round(cores["broker"], 2))
            self.series.append(minute)
            self.say(minute_line(minute))
            previous, self.period_max_lag_s, self.period_max_lag_in = (now, published, committed), 0.0, None

    async def _catch_up(self) -> float | None:
        """Seconds from the end of publishing until a lag sample taken afterwards is zero; None on timeout."""
        flushed_at = time.monotonic()
        next_note = flushed_at + 10
        while True:
            now, sample = time.monotonic(), self.latest
            assert sample is not None
            if sample.measured_at > flushed_at and sample.records == 0:
                self.say(f"caught up {now - flushed_at:.1f}s after publishing ended")
                return now - flushed_at
            self._current_lag_s(now)
            if now > flushed_at + self.config.catch_up_s:
                self.say(f"still {sample.records:,} records behind {self.config.catch_up_s:.0f}s after publishing "
                         "ended; giving up")
                return None
            if now > next_note:
                next_note += 10
                self.say(f"catching up: {sample.records:,} records behind")
            await asyncio.sleep(0.1)

    def _results(self, sent: DriveProgress | None, caught_up_after: float | None,
                 problems: list[str] | None) -> SoakResults:
        sample = self.latest
        assert sample is not None
        published = self.published
        rss = [m.worker_rss_mb for m in self.series]
        growth = rss[-1] / rss[0] if len(rss) > 1 and rss[0] and rss[-1] else None
        answered = [self.probe.answered[r] - at for r, at in self.probe.sent.items() if r in self.probe.answered]
        return SoakResults(
            minutes=self.config.minutes, rate_eps=self.config.rate_eps, interval_s=self.config.interval_s,
            lag_limit_s=self.config.lag_limit_s, published=published, committed=sample.committed_total,
            in_log=sample.end_total, committed_ratio=sample.committed_total / published if published else 0.0,
            max_lag_s=round(self.max_lag_s, 2), max_lag_records=self.max_lag_records,
            broke_at_minute=None if self.broke_at is None else self.period(self.broke_at),
            broke_at_s=None if self.broke_at is None else round(self.broke_at - self.t0, 1),
            worker_rss_growth=None if growth is None else round(growth, 3),
            achieved_rate_eps=round(sent.rate_eps if sent else published / (time.monotonic() - self.t0), 1),
            publishing_complete=sent is not None,
            catch_up_s=None if caught_up_after is None else round(caught_up_after, 1),
            killed_worker_at=self.config.kill_worker_at,
            totals_match=None if problems is None else not problems, totals_problems=problems or [],
            series=self.series, git_sha=git_sha(Path(__file__).parent),
            workload_events=sent.sent if sent else None,
            worker_restart_s=None if self.restart_s is None else round(self.restart_s, 1),
            probes={"sent": len(self.probe.sent), "answered": len(answered), "p99_ms": p99_ms(answered)},
        )


def _mb(reading: object) -> float | None:
    return None if reading is None else round(reading.rss_bytes / _MB, 1)  # type: ignore[attr-defined]


def run_soak(settings: Settings, config: SoakConfig, say: Callable[[str], None] = print) -> SoakResults:
    """Run a soak on a private stack under ``<settings.home>/soak`` and return what it measured.

    Raises :class:`SoakFailed` (naming the log to read) when the stack or the worker fails; a soak that merely
    misses its target returns results whose ``target_met`` is False and whose ``verdict()`` says where.
    """
    settings = private_settings(settings, "soak")
    try:
        claim_home(settings.home, "soak")
    except HomeInUse as busy:
        raise SoakFailed(str(busy), settings.home) from busy
    with EmbeddedStack(settings) as stack:
        settings = stack.settings  # absolute home: the worker and chDB must agree on it
        ensure_topics(settings)
        say(f"stack up under {settings.home} (broker pid {stack.pids['broker']}, {settings.bootstrap}); "
            f"starting the worker ...")
        logs = settings.home / "logs"
        try:
            workers = WorkerSuccession(settings)
        except WorkerNotReady as error:
            raise SoakFailed(f"the worker did not start: {error}", logs / "worker.log") from error
        try:
            say(f"worker pid {workers.current.pid} ready; publishing the demo workload at {config.rate_eps:,.0f}/s "
                f"for {config.minutes:g} x {config.interval_s:g}s (soak pid {os.getpid()})")
            return asyncio.run(_Soak(settings, config, workers, stack.pids["broker"], say).run())
        except BaseException as error:
            explained = _explain(error, logs)
            if explained is error:
                raise
            raise explained from error
        finally:
            with contextlib.suppress(Exception):
                workers.stop()


def _explain(error: BaseException, logs: Path) -> BaseException:
    """What a user should read for ``error`` (an interrupt stays an interrupt)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if isinstance(error, SoakFailed | KeyboardInterrupt):
        return error
    if isinstance(error, WorkerNotReady):
        return SoakFailed(f"the restarted worker did not start: {error}", logs / "worker.log")
    if isinstance(error, BrokerUnavailable | PublishFailed | KafkaError):
        return SoakFailed(f"publishing to or reading from the broker failed: {error!r}", logs / "broker.log")
    if isinstance(error, QueryFailed):
        return SoakFailed(f"the worker did not answer the totals query: {error}", logs / "worker.log")
    return SoakFailed(f"{type(error).__name__}: {error}", logs / "worker.log")


def soak_main(settings: Settings, config: SoakConfig, output: Path, say: Callable[[str], None]) -> int:
    """``ctxflow soak``: run, write ``output``, print the verdict; 0 when the target is met, 1 when it is missed
    or the soak failed (the message names the log to read), 130 when interrupted (Ctrl-C or SIGTERM)."""
    # SIGTERM becomes SIGINT, so asyncio cancels the soak cleanly and every child is stopped as for Ctrl-C.
    previous = signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    try:
        results = run_soak(settings, config, say)
    except KeyboardInterrupt:
        say("interrupted; the stack and the worker are stopped")
        return 130
    except SoakFailed as failed:
        say(f"ctxflow soak failed: {failed}\nsee {failed.log_path}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    results.write(output)
    say(results.verdict())
    say(f"results in {output} (git {results.git_sha})")
    return 0 if results.target_met else 1
