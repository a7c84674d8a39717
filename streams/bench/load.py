"""The latency phase's load generator: agents publishing turns and admission probes at a steady rate, from a
process of their own at low CPU priority.

In a deployment the agents run on other machines; here they share the worker's two cores. Sending from the
benchmark's own process, at the worker's priority, took ~0.3 of a core at 9,000 events/s whenever it asked
for it, and the worker and the broker waited for the CPU meanwhile. So the load runs in a child process at
niceness :data:`NICENESS`: it gets the CPU that the worker, the broker and the probes' subscriber leave,
and the rate it achieved is reported (a starved generator shows as a lower rate, not a better latency).

A probe's send time is taken with ``time.perf_counter()`` right before the SDK queues it. On Linux that is
``CLOCK_MONOTONIC``, one clock for every process of the machine, so the parent compares it with the moment
its own subscriber fetched the decision.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection

from ctxflow.schemas.models import TurnEvent
from ctxflow.streams.bench.corpus import Encoded, admission_for, encode
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import CtxflowClient

#: The load generator's niceness: below the worker, the broker and the subscriber, which keep 0.
NICENESS = 10


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What to send: ``turns`` at ``rate_eps`` (probes included), and after turn ``i`` an admission request
    for the run of ``probes[i]`` when there is one."""

    settings: Settings
    turns: Sequence[Encoded]
    probes: Mapping[int, TurnEvent]
    rate_eps: float


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What was sent: each probe's request id and send time, and the records (turns and probes) per second."""

    sent: dict[str, float]
    rate_eps: float


class LoadFailed(RuntimeError):
    """The load generator process failed; the message carries its traceback."""


async def generate_load(plan: LoadPlan, say: Callable[[str], None], ready_timeout_s: float = 60.0) -> LoadReport:
    """Send ``plan`` from a child process at :data:`NICENESS`; return once everything sent is acknowledged."""
    context = multiprocessing.get_context("spawn")  # no fork: this process has run event loops and threads
    ours, theirs = context.Pipe()
    process = context.Process(target=_child, args=(plan, theirs), name="ctxflow-bench-load", daemon=True)
    process.start()
    theirs.close()
    try:
        await _receive(ours, process, "ready", ready_timeout_s, say)
        ours.send("go")
        report = await _receive(ours, process, "done", None, say)
        assert isinstance(report, LoadReport)
        return report
    finally:
        # The child takes a while to exit (its producer, its loop, its heap); joining on this loop would stop the
        # subscriber meanwhile, and the last probes' decisions would seem to arrive that much later.
        await asyncio.to_thread(process.join, 10)
        if process.is_alive():
            process.kill()
        ours.close()


async def _receive(connection: Connection, process: multiprocessing.process.BaseProcess, expected: str,
                   timeout_s: float | None, say: Callable[[str], None]) -> object:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        # Polled rather than awaited: the subscriber's task shares this loop and must keep fetching meanwhile.
        while not connection.poll():
            if not process.is_alive() and not connection.poll():
                raise LoadFailed(f"the load generator exited with code {process.exitcode} before '{expected}'")
            if deadline is not None and time.monotonic() > deadline:
                raise LoadFailed(f"the load generator sent no '{expected}' within {timeout_s:.0f}s")
            await asyncio.sleep(0.02)
        kind, payload = connection.recv()
        if kind == "progress":
            say(str(payload))
        elif kind == "error":
            raise LoadFailed(f"the load generator failed:\n{payload}")
        elif kind == expected:
            return payload


def _child(plan: LoadPlan, connection: Connection) -> None:
    os.nice(NICENESS)
    try:
        report = asyncio.run(_send_steadily(plan, connection))
    except BaseException:
        connection.send(("error", traceback.format_exc()))
        raise
    connection.send(("done", report))


async def _send_steadily(plan: LoadPlan, connection: Connection) -> LoadReport:
    settings, turns, probes = plan.settings, plan.turns, plan.probes
    turns_topic, admissions_topic = settings.topic("turns"), settings.topic("admissions")
    sent: dict[str, float] = {}
    async with CtxflowClient.from_settings(settings, max_in_flight=100_000) as client:
        connection.send(("ready", None))
        connection.recv()
        began = next_report = time.perf_counter()
        index = records = 0  # records counts probes too: the rate is in input records, like pipeline_eps
        while index < len(turns):
            due = int((time.perf_counter() - began) * plan.rate_eps) + 1
            while records < due and index < len(turns):
                record = turns[index]
                await client.send_raw(turns_topic, record.key, record.value)
                records += 1
                probed = probes.get(index)
                if probed is not None:
                    request_id = f"bench-probe-{index}"
                    probe = encode(client.codec, admission_for(probed, request_id, datetime.now(UTC)))
                    sent[request_id] = time.perf_counter()
                    # Sent as an agent's admission request is (at once), not after the SDK's linger.
                    await client.send_raw(admissions_topic, probe.key, probe.value, urgent=True)
                    records += 1
                index += 1
            now = time.perf_counter()
            if now >= next_report:
                rate = records / max(now - began, 1e-9)
                connection.send(("progress", f"  ... {records:,} records sent at {rate:,.0f}/s"))
                next_report = now + 2.0
            await asyncio.sleep(0.002)
        await client.flush()
        return LoadReport(sent, records / (time.perf_counter() - began))
