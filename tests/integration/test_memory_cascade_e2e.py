"""Deleting a memory through the real stack: ``ctxflow memory delete`` and every projection loses its content.

One worker (hosting the ClickHouse sink) serves the module. A user's memory, larger than the inline limit (so it
also lives in the payload store), is promoted, retrieved by a run (a ``memory`` turn whose item id is the memory
id), and used by two summaries: one over it alone, one over it and another item; the swap decisions carrying
those summaries sit in the run's Redis decisions as the planner projects them. A second memory of the same user
must survive. Then the real CLI deletes the first memory, and every projection ctxflow maintains is searched for
a canary phrase of its content: ClickHouse tables (``memory_records`` read without FINAL, so older versions
count, and the retrieval index ``memory_index``), Redis keys, payload files, the latest record on
``memory.records``. A quarantined fact makes the round
trip through ``ctxflow memory review``; a refused command and a stopped worker each get a clear error.
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
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
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

from tests.support_deploy import fresh_settings
from tests.support_kafka import read_topics, wait_processed, wait_until
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


def _summary(summary_id: str, sources: list[str]) -> Summary:
    return Summary(summary_id=summary_id, job_id=f"job-{summary_id}", tenant_id=TENANT, user_id="ada",
                   session_id="s-1", run_id="run-1", slot=Slot.RETRIEVED, text=f"Summary citing the {CANARY} plan",
                   token_count=12, source_ids=sources, source_digests=[content_digest(s) for s in sources],
                   summarizer="test", summarizer_version="1", depth=1, fidelity=0.9, produced_at=at(20))


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
    manifest = TenantManifest(tenant_id=TENANT, version=1, tier="pro", slot_caps=SlotCaps(), total_cap=1_000_000,
                              updated_at=T0, memory=MemoryGovernance())
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
        # The purge is a mutation ClickHouse applies in the background, usually within a second.
        w.retrieved_turn = wait_until(
            lambda: worker.query(f"SELECT content, content_digest FROM turns WHERE tenant_id = '{TENANT}' AND "
                                 f"item_id = '{doomed}'").rows, lambda rows: bool(rows) and rows[0][0] is None, 30,
            "the retrieved turn's content purged")
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
    assert world.retrieved_turn == [(None, content_digest(DOOMED))]  # the turn row stays, without content


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
