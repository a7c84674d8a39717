"""The summarizer worker against the real embedded broker: real TurnEvents on ``turns``, CompressionJobs naming
their positions (from the produce acknowledgements) on ``compression.jobs``, Summaries and dead letters read back.

Most tests run the worker in-process (a task on the test's loop, so they can wait for its group assignment);
one runs it as a child process, as it is deployed, and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    CompressionJob,
    CompressionSource,
    DeadLetter,
    ItemKind,
    PrivacyMode,
    Role,
    Slot,
    Summary,
    TurnEvent,
    content_digest,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.summarizer_process import SummarizerProcess
from ctxflow.streams.summarizer import SummarizerWorker, summarizer_group, summary_id_of

from tests.support_kafka import read_topics

T = TypeVar("T")
NOW = datetime(2026, 3, 14, 9, 30, tzinfo=UTC)

#: Turns whose identifiers and numbers a summary must keep.
FACTS = (
    "The customer asked about order ORD-10432, shipped on 2026-03-14 from us-east-1.",
    "Refund approved: $1,250.00 to card ending 4417; ticket SUP-2291 stays open.",
    "We decided to use gpt-4o for routing; the budget must stay at most 8,000 tokens per run.",
    "Tool get_invoice() returned invoice INV-77812 with 3 line items totalling 1,250.00 EUR.",
    "Unrelated chatter about the weather that the job does not name.",
)


def turn(tenant: str, run: str, seq: int, content: str | None, *, privacy: PrivacyMode = PrivacyMode.RETAINED,
         digest_of: str | None = None) -> TurnEvent:
    return TurnEvent(
        event_id=f"{run}-e{seq}", tenant_id=tenant, user_id="u1", session_id="s1", run_id=run, agent_id="planner",
        seq=seq, role=Role.USER if seq % 2 == 0 else Role.ASSISTANT, kind=ItemKind.MESSAGE, slot=Slot.HISTORY,
        item_id=f"{run}-i{seq}", content=content, content_digest=content_digest(digest_of or content or ""),
        model="gpt-4o", privacy=privacy, occurred_at=NOW,
    )


def job(job_id: str, tenant: str, run: str, sources: list[CompressionSource], max_tokens: int = 400
        ) -> CompressionJob:
    return CompressionJob(job_id=job_id, tenant_id=tenant, user_id="u1", session_id="s1", run_id=run,
                          slot=Slot.HISTORY, sources=sources, max_tokens=max_tokens, model="gpt-4o",
                          requested_at=NOW)


def source_of(event: TurnEvent, at: tuple[int, int], *, digest: str | None = None) -> CompressionSource:
    return CompressionSource(item_id=event.item_id, content_digest=digest or event.content_digest or "",
                             tokens=20, depth=0, topic="turns", partition=at[0], offset=at[1],
                             label=f"{event.role.value} {event.kind.value}")


async def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
    """Produce ``(key, value)`` records to logical ``topic`` (sent together, so they share record batches);
    returns each one's (partition, offset) from the broker's acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = [await producer.send(settings.topic(topic), value, key=key) for key, value in records]
        return [(meta.partition, meta.offset) for meta in await asyncio.gather(*sent)]
    finally:
        await producer.stop()


async def publish_turns(settings: Settings, codec: Codec, events: list[TurnEvent]) -> list[tuple[int, int]]:
    return await produce(settings, "turns", [(e.tenant_id.encode(), codec.encode(e)) for e in events])


async def publish_jobs(settings: Settings, codec: Codec, jobs: list[CompressionJob]) -> list[tuple[int, int]]:
    return await produce(settings, "compression.jobs", [(j.tenant_id.encode(), codec.encode(j)) for j in jobs])


async def poll(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout_s: float = 20.0,
               what: str = "") -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s}s for {what}; last saw {value!r}")
        await asyncio.sleep(0.1)


async def summaries(settings: Settings) -> list[tuple[tuple[int, int], Summary]]:
    codec = Codec()
    records = await read_topics(settings, ["summaries"])
    return [((r.partition, r.offset), codec.decode(r.value, Summary)) for r in records]


async def dead_letters(settings: Settings) -> list[DeadLetter]:
    codec = Codec()
    return [codec.decode(r.value, DeadLetter) for r in await read_topics(settings, ["deadletters"])]


async def committed(settings: Settings) -> int:
    """Job offsets the summarizer group committed, summed over the partitions."""
    tps = [TopicPartition(settings.topic("compression.jobs"), p) for p in range(settings.partitions)]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(summarizer_group(settings), partitions=tps)
    finally:
        await admin.close()
    return sum(max(meta.offset, 0) for meta in offsets.values() if meta is not None)


@contextlib.asynccontextmanager
async def summarizing(settings: Settings) -> AsyncIterator[SummarizerWorker]:
    worker = SummarizerWorker(settings, progress_every_s=1.0)
    running = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(20):
            await asyncio.wait([running, asyncio.ensure_future(worker.assigned.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            running.result()
        yield worker
    finally:
        worker.stop()
        async with asyncio.timeout(10):
            await running


def test_a_job_becomes_a_summary_that_keeps_its_facts_and_a_redelivered_job_keeps_its_id(settings: Settings) -> None:
    codec = Codec()
    events = [turn("acme", "r1", seq, text) for seq, text in enumerate(FACTS)]

    async def scenario() -> tuple[list[tuple[tuple[int, int], Summary]], int, SummarizerWorker]:
        at = await publish_turns(settings, codec, events)
        # Items 0, 1, 3 and 2 (out of order), not 4: the read must skip what lies around and between them.
        named = [0, 1, 3, 2]
        request = job("job-1", "acme", "r1", [source_of(events[i], at[i]) for i in named])
        async with summarizing(settings) as worker:
            await publish_jobs(settings, codec, [request])
            await publish_jobs(settings, codec, [request])  # redelivered, as after a crash before the commit
            found = await poll(lambda: summaries(settings), lambda s: len(s) == 2, what="two summaries")
            done = await poll(lambda: committed(settings), lambda n: n == 2, what="both jobs committed")
        return found, done, worker

    found, done, worker = asyncio.run(scenario())
    named = [0, 1, 3, 2]
    first, again = (summary for _, summary in found)
    assert first.summary_id == again.summary_id == summary_id_of("job-1")
    assert first.job_id == "job-1" and (first.tenant_id, first.run_id, first.slot) == ("acme", "r1", Slot.HISTORY)
    assert first.source_ids == [events[i].item_id for i in named]
    assert first.source_digests == [content_digest(FACTS[i]) for i in named]
    assert (first.depth, first.summarizer, first.summarizer_version) == (1, "extractive", "1")
    for kept in ("ORD-10432", "2026-03-14", "1,250.00", "SUP-2291", "INV-77812"):
        assert kept in first.text
    assert "weather" not in first.text
    assert first.fidelity >= 0.8
    assert 0 < first.token_count <= 400
    assert again.text == first.text
    assert done == 2 and worker.progress.summaries == 2 and worker.progress.dead_letters == 0
    assert worker.progress.items == 8


def test_jobs_that_cannot_be_summarized_go_to_dead_letters_and_later_jobs_still_do(settings: Settings) -> None:
    codec = Codec()
    good = [turn("acme", "r2", seq, text) for seq, text in enumerate(FACTS[:3])]
    private = turn("acme", "r2", 3, None, privacy=PrivacyMode.NO_RETENTION, digest_of="a secret the run kept private")
    foreign = turn("globex", "r9", 0, "Globex's own turn, order ORD-99999.")

    async def scenario() -> tuple[list[tuple[int, int]], list[DeadLetter], list[Summary]]:
        at = await publish_turns(settings, codec, [*good, private, foreign])
        jobs = [
            job("bad-digest", "acme", "r2", [source_of(good[0], at[0], digest=content_digest("something else"))]),
            job("private", "acme", "r2", [source_of(good[1], at[1]), source_of(private, at[3])]),
            job("missing", "acme", "r2", [source_of(good[0], (at[0][0], 10_000))]),
            job("foreign", "acme", "r2", [CompressionSource(
                item_id=foreign.item_id, content_digest=foreign.content_digest or "", tokens=9, depth=0,
                topic="turns", partition=at[4][0], offset=at[4][1])]),
            job("good", "acme", "r2", [source_of(e, at[i]) for i, e in enumerate(good)]),
        ]
        async with summarizing(settings) as worker:
            positions = await publish_jobs(settings, codec, jobs)
            positions += await produce(settings, "compression.jobs", [(b"acme", b"not avro at all")])
            letters = await poll(lambda: dead_letters(settings), lambda d: len(d) == 5, what="five dead letters")
            found = await poll(lambda: summaries(settings), lambda s: len(s) == 1, what="the good job's summary")
            await poll(lambda: committed(settings), lambda n: n == 6, what="every job committed")
            assert worker.progress.dead_letters == 5 and worker.progress.summaries == 1
        return positions, letters, [summary for _, summary in found]

    positions, letters, found = asyncio.run(scenario())
    jobs_topic = settings.topic("compression.jobs")
    by_id = {letter.dead_letter_id: letter for letter in letters}
    reasons = {}
    names = ["bad-digest", "private", "missing", "foreign", "good", "undecodable"]
    for name, (partition, offset) in zip(names, positions, strict=True):
        if name == "good":
            assert f"{jobs_topic}:{partition}:{offset}" not in by_id
            continue
        letter = by_id[f"{jobs_topic}:{partition}:{offset}"]
        assert (letter.source_topic, letter.source_partition, letter.source_offset) == (jobs_topic, partition, offset)
        reasons[name] = (letter.reason_code, letter.reason, letter.tenant_id)
    assert reasons["bad-digest"][0] == "processing_error" and "sha256 differs" in reasons["bad-digest"][1]
    assert "no content (privacy no_retention)" in reasons["private"][1]
    assert "no record at that position" in reasons["missing"][1]
    assert "another tenant" in reasons["foreign"][1] and "globex" not in reasons["foreign"][1]
    assert reasons["undecodable"][0] == "undecodable"
    assert {reasons[n][2] for n in ("bad-digest", "private", "missing", "foreign")} == {"acme"}
    assert "secret" not in " ".join(letter.reason for letter in letters)
    assert [summary.job_id for summary in found] == ["good"]
    assert "ORD-10432" in found[0].text and "ORD-99999" not in found[0].text


def test_a_summary_of_a_summary_is_two_deep_and_a_third_level_is_refused(settings: Settings) -> None:
    codec = Codec()
    events = [turn("acme", "r3", seq, text) for seq, text in enumerate(FACTS)]

    async def scenario() -> tuple[list[Summary], list[DeadLetter]]:
        at = await publish_turns(settings, codec, events)
        async with summarizing(settings):
            await publish_jobs(settings, codec, [job("level-1", "acme", "r3", [source_of(events[i], at[i])
                                                                                for i in (0, 1)])])
            [(s1_at, s1)] = await poll(lambda: summaries(settings), lambda s: len(s) == 1, what="the first summary")
            from_summary = CompressionSource(item_id=s1.summary_id, content_digest=content_digest(s1.text),
                                             tokens=s1.token_count, depth=1, topic="summaries",
                                             partition=s1_at[0], offset=s1_at[1], label="summary")
            await publish_jobs(settings, codec, [job("level-2", "acme", "r3", [from_summary,
                                                                                source_of(events[3], at[3])])])
            found = await poll(lambda: summaries(settings), lambda s: len(s) == 2, what="the second summary")
            s2_at, s2 = found[1]
            deeper = CompressionSource(item_id=s2.summary_id, content_digest=content_digest(s2.text),
                                       tokens=s2.token_count, depth=2, topic="summaries", partition=s2_at[0],
                                       offset=s2_at[1])
            await publish_jobs(settings, codec, [job("level-3", "acme", "r3", [deeper])])
            letters = await poll(lambda: dead_letters(settings), lambda d: len(d) == 1, what="the refusal")
        return [summary for _, summary in found], letters

    (s1, s2), [letter] = asyncio.run(scenario())
    assert (s1.depth, s2.depth) == (1, 2)
    assert s2.source_ids == [s1.summary_id, events[3].item_id]
    assert s2.source_digests == [content_digest(s1.text), content_digest(FACTS[3])]
    for kept in ("ORD-10432", "SUP-2291", "INV-77812"):
        assert kept in s2.text
    assert "at most 2 deep" in letter.reason


def test_the_summarizer_process_summarizes_and_stops_within_seconds_of_sigterm(settings: Settings) -> None:
    codec = Codec()
    events = [turn("acme", "r4", seq, text) for seq, text in enumerate(FACTS[:2])]
    at = asyncio.run(publish_turns(settings, codec, events))
    with SummarizerProcess(settings) as process:
        asyncio.run(publish_jobs(settings, codec, [job("proc-1", "acme", "r4", [source_of(e, at[i])
                                                                                for i, e in enumerate(events)])]))
        [(_, summary)] = asyncio.run(poll(lambda: summaries(settings), lambda s: len(s) == 1, what="a summary"))
        asyncio.run(poll(lambda: committed(settings), lambda n: n == 1, what="the job committed"))
        began = time.monotonic()
        process.stop(grace_s=10)  # SIGTERM; a kill only after 10 s, which would show as exit code -9
        stopped_in = time.monotonic() - began
    assert summary.summary_id == summary_id_of("proc-1") and "ORD-10432" in summary.text
    assert process.exit_code() == 0, process.log_path.read_text()
    assert stopped_in < 5.0
    log = process.log_path.read_text()
    assert 'msg="summarizer stopped"' in log and "summaries=1" in log
