"""Deleting a memory through the real stack: ``ctxflow memory delete`` and every projection loses its content.

One worker (hosting the ClickHouse sink) serves the module. A user's memory, larger than the inline limit (so it
also lives in the payload store), is promoted, retrieved by a run (a ``memory`` turn whose item id is the memory
id), and used by two summaries: one over it alone, one over it and another item; the swap decisions carrying
those summaries sit in the run's Redis decisions as the planner projects them. Two more runs retrieve it while
their retrieved slot fills: the eviction planner asks for a compression of each, the test answers as a summarizer
would, and one summary waits in the planner's working set (its text in the planner's table) while the other is
swapped in. A second memory of the same user must survive. Then the real CLI deletes the first memory, and every
projection ctxflow maintains is searched for a canary phrase of its content: ClickHouse tables (``memory_records``
read without FINAL, so older versions count, and the retrieval index ``memory_index``), Redis keys, payload files,
the latest record on ``memory.records``, the planner's table as its changelog holds it; the run whose summary was
swapped in no longer counts its tokens. A quarantined fact makes the round trip through ``ctxflow memory review``;
a refused command and a stopped worker each get a clear error.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from ctxflow.processors.eviction.workset import WorkingSet
from ctxflow.processors.manifest import SLOT_INDEX
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    CompressionJob,
    Decision,
    DecisionKind,
    EvictionPolicy,
    EvictionStrategy,
    Invalidation,
    ItemKind,
    MemoryGovernance,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryType,
    MemoryVerdict,
    Role,
    Slot,
    SlotCaps,
    Summary,
    SummaryProvenance,
    TenantManifest,
    Verification,
    content_digest,
)
from ctxflow.sinks.clickhouse import connect
from ctxflow.sinks.redis import RedisProjection, decisions_key
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.worker_process import WorkerProcess, settings_env

from tests.support_deploy import fresh_settings, redis_headroom
from tests.support_kafka import decisions_on_topic, read_topics, wait_processed, wait_until
from tests.support_tables import run_ledgers, working_sets
from tests.support_traffic import publish, send_raw

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
TENANT = "cascade-e2e"
CANARY = "canary-7f3a-blue-heron"
DOOMED = f"Ada's notes on the {CANARY} migration.\n" + "\n".join(
    f"step {i}: move shard {i:04d} after the {CANARY} freeze" for i in range(400))
SMALL = f"Ada keeps the {CANARY} runbook in the blue binder"  # inline: indexed with its text
KEPT = "Prefers answers in French"
CTXFLOW = Path(sys.executable).with_name("ctxflow")
PROJECTED = ("memory_records", "memory_index", "turns", "decisions", "invalidations", "memory_verdicts", "dead_letters",
             "envelopes", "costs")
#: The retrieved slot's cap: run-1's retrievals stay well below where compression starts (80%).
RETRIEVED_CAP = 4000
RETRIEVED = SLOT_INDEX[Slot.RETRIEVED]
#: Runs whose summary quoting the doomed memory the planner prepared, or swapped in, before the deletion.
PREPARED, SWAPPED = "run-prepared", "run-swapped"
SUMMARY_TOKENS = 100


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ctxflow(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, in the deployment's environment."""
    return subprocess.run([str(CTXFLOW), *args], env=settings_env(settings), capture_output=True, text=True,
                          timeout=180)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _decoded(settings: Settings, topic: str, model: type) -> list[Any]:
    codec = Codec(settings.schema_registry_url)
    return [codec.decode(r.value, model) for r in asyncio.run(read_topics(settings, [topic])) if r.value]


def _latest(settings: Settings) -> dict[str, MemoryRecord]:
    return {r.memory_id: r for r in _decoded(settings, "memory.records", MemoryRecord)}


def _swap(summary_id: str, text: str) -> Decision:
    return Decision(decision_id=f"dec-{summary_id}", tenant_id=TENANT, user_id="ada", session_id="s-1",
                    run_id="run-1", kind=DecisionKind.SWAP, reason="swap in a summary", decided_at=at(30),
                    summary=SummaryProvenance(summary_id=summary_id, text=text, token_count=20,
                                              source_ids=["x"], source_digests=["0" * 64], summarizer="s",
                                              summarizer_version="1", depth=1, fidelity=0.9))


@dataclass
class World:
    settings: Settings
    worker: WorkerProcess
    doomed: str
    kept: str
    quarantined: str
    deleted: subprocess.CompletedProcess[str]
    reviewed: subprocess.CompletedProcess[str]
    review_list: str
    refused: subprocess.CompletedProcess[str]
    redis_after: dict[str, Any]
    payloads_after: list[bytes]
    raw_tables: dict[str, list[tuple]]
    retrieved_turn: list[tuple] | None = None
    no_worker: subprocess.CompletedProcess[str] | None = None
    #: The planner's working sets of PREPARED and SWAPPED as their changelog held them before and after the delete.
    worksets_before: dict[str, bytes] | None = None
    worksets_after: dict[str, bytes] | None = None
    #: SWAPPED's live retrieved tokens in its run ledger before and after the delete, and in Redis after it.
    swapped_live: tuple[int, int] | None = None
    swapped_headroom: int | None = None


def _summary(summary_id: str, sources: list[str]) -> Summary:
    return Summary(summary_id=summary_id, job_id=f"job-{summary_id}", tenant_id=TENANT, user_id="ada",
                   session_id="s-1", run_id="run-1", slot=Slot.RETRIEVED, text=f"Summary citing the {CANARY} plan",
                   token_count=12, source_ids=sources, source_digests=[content_digest(s) for s in sources],
                   summarizer="test", summarizer_version="1", depth=1, fidelity=0.9, produced_at=at(20))


def _answer(job: CompressionJob, summary_id: str) -> Summary:
    """What a summarizer sends back for ``job``: a summary quoting its sources (the doomed memory among them)."""
    return Summary(summary_id=summary_id, job_id=job.job_id, tenant_id=TENANT, user_id=job.user_id,
                   session_id=job.session_id, run_id=job.run_id, slot=job.slot,
                   text=f"Summary of {summary_id} citing the {CANARY} plan", token_count=SUMMARY_TOKENS,
                   source_ids=[s.item_id for s in job.sources], source_digests=[s.content_digest for s in job.sources],
                   summarizer="test", summarizer_version="1", depth=1, fidelity=0.95, produced_at=at(25))


def _filling_runs(settings: Settings, doomed: str) -> None:
    """PREPARED and SWAPPED retrieve the doomed memory while their retrieved slot reaches 80% of its cap; the planner
    asks for a summary of the oldest items (the memory and the chunk after it); the test answers both, and one
    more chunk takes SWAPPED past its soft watermark, where the prepared summary is swapped in."""
    runs = {run_id: RunContext(tenant_id=TENANT, user_id="ada", session_id=f"s-{run_id}", agent_id="assistant",
                               model="gpt-4o", run_id=run_id,
                               id_factory=iter(f"{run_id}-item-{i}" for i in range(100)).__next__)
            for run_id in (PREPARED, SWAPPED)}
    chunk = "Background reading on the migration plan, kept for reference."
    publish(settings, [turn for run in runs.values() for turn in [
        run.turn(Role.TOOL, ItemKind.MEMORY, Slot.RETRIEVED, DOOMED, item_id=doomed, token_count=600, at=at(12)),
        *(run.turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, chunk, token_count=tokens, at=at(13 + i))
          for i, tokens in enumerate((600, 500, 500, 500, 500)))]])  # 3,200 of 4,000: compression asked for
    wait_processed(settings)
    jobs = {j.run_id: j for j in _decoded(settings, "compression.jobs", CompressionJob) if j.tenant_id == TENANT}
    assert doomed in [s.item_id for s in jobs[SWAPPED].sources], jobs
    codec = Codec(settings.schema_registry_url)
    send_raw(settings, [("summaries", TENANT.encode(), codec.encode(_answer(jobs[r], f"sum-{r}"))) for r in runs])
    wait_processed(settings)
    publish(settings, [runs[SWAPPED].turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, chunk,
                                          token_count=300, at=at(26))])
    wait_processed(settings)
    swaps = [d for d in decisions_on_topic(settings) if d.kind is DecisionKind.SWAP and d.tenant_id == TENANT]
    assert [(d.run_id, d.summary.summary_id) for d in swaps if d.summary] == [(SWAPPED, f"sum-{SWAPPED}")]


def _redis_values(settings: Settings) -> dict[str, Any]:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        found: dict[str, Any] = {}
        for key in client.scan_iter(f"ctxflow:{TENANT}:*"):
            kind = client.type(key)
            found[key.decode()] = client.hgetall(key) if kind == b"hash" else client.get(key)
        return found
    finally:
        client.close()


@pytest.fixture(scope="module")
def world(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = fresh_settings(stack, tmp_path_factory.mktemp("cascade-e2e") / "home")
    run = RunContext(tenant_id=TENANT, user_id="ada", session_id="s-1", agent_id="assistant", model="gpt-4o",
                     run_id="run-1", id_factory=iter(f"id-{i}" for i in range(10_000)).__next__)
    fact = {"scope": MemoryScope.TENANT, "type_": MemoryType.FACT, "subject": "alice", "attribute": "timezone",
            "corroborating_run_ids": ["run-7", "run-8"], "verified_by": "ops", "confidence": 0.9}
    manifest = TenantManifest(tenant_id=TENANT, version=1, tier="pro", slot_caps=SlotCaps(retrieved=RETRIEVED_CAP),
                              total_cap=1_000_000, updated_at=T0, memory=MemoryGovernance(),
                              eviction=EvictionPolicy(strategy=EvictionStrategy.SUMMARIZATION))
    candidates = [
        run.memory_candidate(MemoryScope.USER, MemoryType.EPISODE, DOOMED, confidence=0.9, at=at(1)),
        run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, KEPT, confidence=0.9, at=at(2)),
        run.memory_candidate(MemoryScope.USER, MemoryType.EPISODE, SMALL, confidence=0.9, at=at(2.5)),
        run.memory_candidate(content="Alice works in CET", value="CET", at=at(3),
                             verification=Verification.HUMAN_APPROVED, **fact),
        run.memory_candidate(content="Alice works in PST", value="PST", at=at(4),
                             verification=Verification.CORROBORATED, **fact),
    ]
    with WorkerProcess(settings) as worker:
        publish(settings, [manifest, run.started(at=at(0))])
        wait_processed(settings)
        publish(settings, candidates)
        wait_processed(settings)
        verdicts = {v.candidate_id: v for v in _decoded(settings, "memory.verdicts", MemoryVerdict)}
        doomed, kept, small, _, quarantined = (verdicts[c.candidate_id].memory_id for c in candidates)
        assert doomed and kept and small and quarantined
        # A run retrieves the memory; the summarizer uses it in two summaries; the planner's swap decisions
        # carrying them are in the run's Redis decisions.
        asyncio.run(_project_swaps(settings))
        publish(settings, [
            run.turn(Role.TOOL, ItemKind.MEMORY, Slot.RETRIEVED, DOOMED, item_id=doomed, token_count=2000, at=at(10)),
            run.turn(Role.TOOL, ItemKind.MEMORY, Slot.RETRIEVED, KEPT, item_id=kept, token_count=8, at=at(11)),
        ])
        codec = Codec(settings.schema_registry_url)
        send_raw(settings, [("summaries", TENANT.encode(), codec.encode(s)) for s in (
            _summary("sum-alone", [doomed]), _summary("sum-shared", [doomed, "id-other-item"]))])
        wait_processed(settings)
        assert CANARY in str(_redis_values(settings)) and CANARY in str(worker.query(
            f"SELECT content FROM turns WHERE tenant_id = '{TENANT}'").rows)  # the canary is everywhere first
        assert CANARY in str(worker.query(f"SELECT text FROM memory_index WHERE tenant_id = '{TENANT}'").rows)
        _filling_runs(settings, doomed)
        before = {run: ws for (tenant, run), ws in working_sets(settings).items() if tenant == TENANT}
        live_before = run_ledgers(settings)[(TENANT, SWAPPED)].live(RETRIEVED)
        deleted = ctxflow(settings, "memory", "delete", "--tenant", TENANT, "--id", doomed, "--by", "dpo",
                          "--reason", "erasure request", "--yes")
        ok(ctxflow(settings, "memory", "delete", "--tenant", TENANT, "--id", small, "--yes"))
        review_list = ok(ctxflow(settings, "memory", "review", "--tenant", TENANT))
        reviewed = ctxflow(settings, "memory", "review", "--tenant", TENANT, "--id", quarantined, "--reinstate",
                           "--by", "lead")
        refused = ctxflow(settings, "memory", "delete", "--tenant", TENANT, "--id", "mem-nope", "--yes")
        wait_processed(settings)
        redis_after = _redis_values(settings)
        w = World(settings, worker, doomed, kept, quarantined, deleted, reviewed, review_list, refused, redis_after,
                  [p.read_bytes() for p in Path(settings.payload_root).rglob("*") if p.is_file()], {})
        # wait_processed also waited for the worker to read back its own invalidations (the planner's input).
        w.worksets_before = before
        w.worksets_after = {run: ws for (tenant, run), ws in working_sets(settings).items() if tenant == TENANT}
        w.swapped_live = (live_before, run_ledgers(settings)[(TENANT, SWAPPED)].live(RETRIEVED))
        headroom = redis_headroom(settings, TENANT, SWAPPED)
        w.swapped_headroom = headroom.used[Slot.RETRIEVED.value] if headroom is not None else None
        # The purge is a mutation ClickHouse applies in the background, usually within a second.
        w.retrieved_turn = wait_until(
            lambda: worker.query(f"SELECT content, content_digest FROM turns WHERE tenant_id = '{TENANT}' AND "
                                 f"item_id = '{doomed}'").rows,
            lambda rows: bool(rows) and all(r[0] is None for r in rows), 30, "the retrieved turns' content purged")
    # The worker has released chDB: read every table as stored, older versions and unmerged rows included.
    client = connect(settings.chdb_dsn)
    try:
        # The purges are mutations ClickHouse applies in the background (resumed when chDB opens here).
        wait_until(lambda: client.query("SELECT count() FROM system.mutations WHERE database = 'ctxflow' AND "
                                        "NOT is_done").result_rows[0][0], lambda n: n == 0, 60, "purges applied")
        w.raw_tables = {t: client.query(f"SELECT * FROM ctxflow.{t} WHERE tenant_id = '{TENANT}'").result_rows
                        for t in PROJECTED}
    finally:
        client.close()
    w.no_worker = ctxflow(settings, "memory", "delete", "--tenant", TENANT, "--user", "ada", "--yes", "--timeout", "3")
    yield w


async def _project_swaps(settings: Settings) -> None:
    projection = RedisProjection(settings.redis_url, ttl_s=3600)
    try:
        await projection.write([], [_swap("sum-alone", f"only the {CANARY} notes"),
                                    _swap("sum-shared", f"the {CANARY} notes and the other item")])
    finally:
        await projection.close()


def test_the_cli_deletes_the_record_and_the_latest_record_is_a_tombstone(world: World) -> None:
    out = ok(world.deleted)
    assert "applied delete command" in out and world.doomed in out
    latest = _latest(world.settings)
    tomb = latest[world.doomed]
    assert (tomb.status, tomb.content, tomb.reason) == (MemoryStatus.REVOKED, None, "deleted by dpo: erasure request")
    assert tomb.content_digest == content_digest(DOOMED) and tomb.source_run_id == "run-1"  # provenance kept
    assert latest[world.kept].status is MemoryStatus.ACTIVE  # the user's other memory stays


def test_every_clickhouse_table_is_free_of_the_content_older_versions_included(world: World) -> None:
    for table, rows in world.raw_tables.items():
        assert CANARY not in str(rows), table
    versions = [r for r in world.raw_tables["memory_records"] if world.doomed in r]
    assert versions and all(r[8] is None for r in versions)  # only the tombstone's row is left: no content
    kept = [r for r in world.raw_tables["turns"] if KEPT in str(r)]
    assert kept  # the other memory's retrieval keeps its content
    # The turn rows stay (run-1's and the two filling runs'), without content.
    assert world.retrieved_turn == [(None, content_digest(DOOMED))] * 3


def test_redis_and_payloads_hold_nothing_of_it_and_shared_summaries_are_withdrawn(world: World) -> None:
    assert CANARY not in str(world.redis_after)
    decisions = world.redis_after[decisions_key(TENANT, "run-1")]
    assert b"dec-sum-alone" not in decisions  # its only source was deleted: removed
    shared = Decision.model_validate_json(decisions[b"dec-sum-shared"])
    assert shared.summary is not None and shared.summary.text is None  # withdrawn, provenance kept
    assert all(CANARY.encode() not in data for data in world.payloads_after)


def test_every_derived_layer_got_its_invalidation(world: World) -> None:
    mine = [i for i in _decoded(world.settings, "invalidations", Invalidation) if i.source_memory_id is None
            and i.reason != "reinstated by lead" and i.tenant_id == TENANT]
    targets = {(i.target_type, i.target_id, i.kind.value) for i in mine}
    record = _latest(world.settings)[world.doomed]
    assert {("memory_record", world.doomed, "tombstone"), ("retrieval_index", world.doomed, "tombstone"),
            ("turn_content", world.doomed, "tombstone"), ("payload", record.payload_ref, "tombstone"),
            ("summary", "sum-alone", "tombstone"), ("summary", "sum-shared", "invalidation")} <= targets


def test_a_quarantined_fact_is_listed_and_reinstated_through_the_cli(world: World) -> None:
    assert world.quarantined in world.review_list
    assert "applied review command" in ok(world.reviewed)
    record = _latest(world.settings)[world.quarantined]
    assert (record.status, record.reason) == (MemoryStatus.ACTIVE, "reinstated by lead")


def test_a_refused_command_and_a_missing_worker_are_explained(world: World) -> None:
    assert world.refused.returncode == 1 and "has no memory mem-nope" in world.refused.stderr
    assert world.no_worker is not None and world.no_worker.returncode == 1
    assert "Is a worker running?" in world.no_worker.stderr and "ctxflow worker" in world.no_worker.stderr


def test_the_planner_drops_a_prepared_summary_that_quoted_the_deleted_memory(world: World) -> None:
    assert world.worksets_before is not None and world.worksets_after is not None
    before, after = world.worksets_before[PREPARED], world.worksets_after[PREPARED]
    assert CANARY.encode() in before  # the summary's text waited in the planner's table
    prepared = WorkingSet.from_bytes(before).prepared
    assert prepared is not None and prepared.summary_id == f"sum-{PREPARED}"
    assert CANARY.encode() not in after and WorkingSet.from_bytes(after).prepared is None


def test_a_swapped_in_summary_that_quoted_the_deleted_memory_leaves_the_run_and_its_tokens_with_it(
        world: World) -> None:
    assert world.worksets_before is not None and world.worksets_after is not None and world.swapped_live
    summary = f"sum-{SWAPPED}"
    assert summary in WorkingSet.from_bytes(world.worksets_before[SWAPPED]).item_ids()
    assert summary not in WorkingSet.from_bytes(world.worksets_after[SWAPPED]).item_ids()
    before, after = world.swapped_live
    assert after == before - SUMMARY_TOKENS  # the run's usage fell by the summary's tokens
    assert world.swapped_headroom == after  # and its headroom as agents read it
    (evict,) = [d for d in decisions_on_topic(world.settings) if d.run_id == SWAPPED and d.kind is DecisionKind.EVICT]
    assert [(a.item_id, a.tokens) for a in evict.actions] == [(summary, SUMMARY_TOKENS)]
    assert "its source memory deleted" in evict.reason and CANARY not in evict.reason
    assert (evict.user_id, evict.session_id) == ("ada", f"s-{SWAPPED}")
