"""Following a run's or a session's decisions through the SDK, whatever state the decisions topic is in.

Every case runs against the embedded broker on a fresh four-partition decisions topic: partitions that never
held a record, partitions that did, a backlog of other tenants. The wanted decision must arrive within seconds
(each wait is bounded by a timeout, which fails the test), and leaving the stream must return at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from aiokafka.partitioner import DefaultPartitioner
from ctxflow.schemas.models import Decision, DecisionKind
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import CtxflowClient, RunContext, record_key
from ctxflow.streams.sdk.readers import TopicReader
from ctxflow.streams.topics import DECISIONS

T = TypeVar("T")

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
#: Long enough for a loaded machine, far shorter than a hang.
ARRIVAL_S = 5.0
#: A whole scenario: connect, publish, enter, receive, leave.
SCENARIO_S = 15.0


def run_within(scenario: Callable[[], Coroutine[Any, Any, T]], limit_s: float = SCENARIO_S) -> T:
    """Run ``scenario``; fail if it took ``limit_s`` or more.

    Measured, not only bounded: a timeout that fires while aiokafka's ``stop()`` waits is swallowed there, so
    ``asyncio.timeout`` alone lets a reader that hung on closing return as if nothing happened.
    """
    async def bounded() -> T:
        async with asyncio.timeout(limit_s):
            return await scenario()

    began = time.monotonic()
    result = asyncio.run(bounded())
    assert time.monotonic() - began < limit_s, f"took {time.monotonic() - began:.1f}s: it hung and was cut off"
    return result


def decision(tenant_id: str, run_id: str, reason: str, session_id: str = "s1") -> Decision:
    return Decision(decision_id=f"{tenant_id}-{run_id}-{reason}", tenant_id=tenant_id, run_id=run_id,
                    session_id=session_id, kind=DecisionKind.BUDGET_STATE, reason=reason, decided_at=NOW)


def run_on(settings: Settings, partition: int, tenant_id: str = "acme", prefix: str = "run") -> str:
    """A run id whose decisions (key ``tenant_id:run_id``) land on ``partition``."""
    partitions = list(range(DECISIONS.partition_count(settings)))
    pick = DefaultPartitioner()
    return next(f"{prefix}-{n}" for n in itertools.count()
                if pick(f"{tenant_id}:{prefix}-{n}".encode(), partitions, partitions) == partition)


async def until_reason(stream: AsyncIterator[Decision], reason: str, timeout_s: float = ARRIVAL_S
                       ) -> list[Decision]:
    """What ``stream`` yields up to and including the first decision with ``reason``; fails past ``timeout_s``."""
    got: list[Decision] = []
    async with asyncio.timeout(timeout_s), contextlib.aclosing(aiter(stream)) as items:  # type: ignore[type-var]
        async for item in items:
            got.append(item)
            if item.reason == reason:
                return got
    raise AssertionError(f"stream ended before {reason!r}; got {got}")


async def publish(client: CtxflowClient, *decisions: Decision) -> None:
    for item in decisions:
        await client.publish(item)
    await client.flush()


@pytest.mark.parametrize("from_beginning", [False, True], ids=["live", "from-beginning"])
@pytest.mark.parametrize("narrowed_to", ["run", "session"])
def test_a_topic_no_partition_ever_held_delivers_the_first_decision_published_after_entry(
        settings: Settings, from_beginning: bool, narrowed_to: str) -> None:
    run = run_on(settings, 2)
    wanted = decision("acme", run, "wanted", session_id="s-wanted")
    # Same partition, published first: the stream must skip it by its filter, not by luck of ordering.
    other = decision("acme", run if narrowed_to == "session" else run_on(settings, 2, prefix="other"), "other")
    scope: dict[str, Any] = {"run_id": run} if narrowed_to == "run" else {"session_id": "s-wanted"}

    async def scenario() -> list[Decision]:
        async with CtxflowClient.from_settings(settings) as client, \
                client.decisions("acme", from_beginning=from_beginning, **scope) as stream:
            await publish(client, other, wanted)
            return await until_reason(stream, "wanted")

    assert run_within(scenario) == [wanted]


@pytest.mark.parametrize("from_beginning", [False, True], ids=["live", "from-beginning"])
def test_partitions_that_held_records_and_partitions_that_never_did_both_deliver(
        settings: Settings, from_beginning: bool) -> None:
    # Partitions 0 and 1 hold records before entry; 2 and 3 never did until the session's new decision lands on 3.
    old = decision("acme", run_on(settings, 0), "old", session_id="s-wanted")
    noise = [decision("acme", run_on(settings, 0, prefix="x"), "other session", session_id="s-other"),
             decision("globex", run_on(settings, 1, "globex"), "other tenant", session_id="s-wanted")]
    new = decision("acme", run_on(settings, 3), "new", session_id="s-wanted")

    async def scenario() -> list[Decision]:
        async with CtxflowClient.from_settings(settings) as client:
            await publish(client, old, *noise)
            async with client.decisions("acme", session_id="s-wanted", from_beginning=from_beginning) as stream:
                await publish(client, new)
                return await until_reason(stream, "new")

    assert run_within(scenario) == ([old, new] if from_beginning else [new])


def test_a_sessions_stream_carries_its_sub_agents_decisions_and_not_a_lookalike_sessions(settings: Settings) -> None:
    parent = RunContext(tenant_id="acme", user_id="u1", session_id="s-wanted", agent_id="planner", model="gpt-4o")
    kid = parent.child("researcher", run_id=run_on(settings, 1, prefix="kid"))
    # One partition, so the order of arrival is the order of publication.
    lookalike = decision("acme", run_on(settings, 1, prefix="look"), "lookalike", session_id="s-wanted-2")
    sub_agent = decision("acme", kid.run_id, "sub-agent", session_id=kid.session_id)
    last = decision("acme", run_on(settings, 1), "last", session_id="s-wanted")

    async def scenario() -> list[Decision]:
        async with CtxflowClient.from_settings(settings) as client, \
                client.decisions("acme", session_id="s-wanted") as stream:
            await publish(client, lookalike, sub_agent, last)
            return await until_reason(stream, "last")

    assert run_within(scenario) == [sub_agent, last]


@pytest.mark.parametrize("from_beginning", [False, True], ids=["live", "from-beginning"])
def test_a_backlog_of_other_tenants_neither_delays_entry_nor_the_runs_decisions(
        settings: Settings, from_beginning: bool) -> None:
    run = run_on(settings, 1)
    backlog = [decision(f"tenant-{n % 40}", f"r{n}", "theirs") for n in range(3_000)]
    old, new = decision("acme", run, "old"), decision("acme", run, "new")

    async def scenario() -> tuple[list[Decision], float]:
        async with CtxflowClient.from_settings(settings) as client:
            await publish(client, *backlog[:1_500], old, *backlog[1_500:])
            began = time.monotonic()
            async with client.decisions("acme", run_id=run, from_beginning=from_beginning) as stream:
                entered_s = time.monotonic() - began
                await publish(client, new)
                return await until_reason(stream, "new"), entered_s

    got, entered_s = run_within(scenario)
    assert got == ([old, new] if from_beginning else [new])
    assert entered_s < ARRIVAL_S


def test_decisions_reach_a_subscriber_well_within_the_default_fetch_wait(settings: Settings) -> None:
    # The embedded broker holds every fetch for the consumer's fetch wait. With aiokafka's default (500 ms) most
    # decisions here arrived ~250 ms after they were stored; with the SDK's 25 ms (Settings.fetch_max_wait_ms), ~15.
    run = run_on(settings, 0)
    topic = settings.topic(DECISIONS.name)

    async def scenario() -> list[float]:
        delays: list[float] = []
        async with CtxflowClient.from_settings(settings) as client, client.decisions("acme", run_id=run) as stream:
            items = aiter(stream)
            for n in range(7):
                item = decision("acme", run, f"n{n}")
                sent = time.monotonic()
                await client.send_raw(topic, record_key(DECISIONS, item), client.codec.encode(item), urgent=True)
                async with asyncio.timeout(ARRIVAL_S):
                    assert (await anext(items)).reason == f"n{n}"
                delays.append(time.monotonic() - sent)
            await items.aclose()  # type: ignore[attr-defined]
        return delays

    delays = run_within(scenario)
    assert statistics.median(delays) < 0.15, [f"{d:.3f}" for d in delays]


@pytest.mark.parametrize("from_beginning", [False, True], ids=["live", "from-beginning"])
def test_the_reader_under_the_stream_reads_to_the_end_of_a_never_written_topic_and_closes(
        settings: Settings, from_beginning: bool) -> None:
    # Measuring the end again (until_end) used to re-assign the consumer while the broker held its fetch of
    # the empty partitions; closing it right after then never returned (aiokafka lost the cancellation).
    async def scenario() -> list[Any]:
        async with CtxflowClient.from_settings(settings) as client, \
                TopicReader(client, client.topic(DECISIONS), from_beginning) as reader:
            return await reader.until_end(ARRIVAL_S)

    assert run_within(scenario, ARRIVAL_S) == []
