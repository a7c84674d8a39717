"""The long-term store and delegation end to end: SDK records through the real worker to records, archives in the
payload store, ClickHouse, and back with ``ctxflow memory rehydrate``.

The session's shared worker serves the module. Tenant ``store-e2e`` has a store quota of 10 (evict at 9, down to
7); its run proposes 12 notes an hour apart, all accepted, the last one superseding an earlier note: the store
evicts twice (9 live -> 7), the oldest first, each archived before it is removed. Tenant ``deleg-e2e`` has a
no-retention parent run whose children claim to be retained (one proposed a memory before its start arrived:
revoked once the start shows it), a child naming another user, and a child of a retained root started in the
root's own session: each violation is a rejection decision, the no-retention parent's children's candidates are
refused as no-retention, and the session squatter's session-scope candidate is refused
(``delegation_shared_session``) while an SDK child of the same root (``child()``: a session of its own) breaks
nothing and keeps its session memory. Every expectation is computed here from the records sent.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    Invalidation,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryStore,
    MemoryType,
    MemoryVerdict,
    PrivacyMode,
    SlotCaps,
    TenantManifest,
)
from ctxflow.sinks.payloads import LocalPayloadStore
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.worker_process import WorkerProcess, settings_env

from tests.support_deploy import SharedDeployment
from tests.support_kafka import read_topics, wait_processed
from tests.support_traffic import publish

# Recent: ClickHouse drops event rows (the invalidations among them) older than its retention as they arrive.
T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
STORE, DELEG = "store-e2e", "deleg-e2e"
NOTES = 12
EDITOR = 4  # the note the last one supersedes


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def _ctx(tenant: str, run_id: str, *, user: str = "ada", parent: str | None = None,
         privacy: PrivacyMode = PrivacyMode.RETAINED, session: str | None = None) -> RunContext:
    counter = iter(range(1_000_000))
    return RunContext(tenant_id=tenant, user_id=user, session_id=session or f"s-{run_id}", agent_id="assistant",
                      model="gpt-4o", run_id=run_id, parent_run_id=parent, workflow_id=parent or run_id,
                      privacy=privacy, policy_version="p-1", id_factory=lambda: f"{run_id}-{next(counter)}")


def _manifest(tenant: str, store: MemoryStore | None) -> TenantManifest:
    return TenantManifest(tenant_id=tenant, version=1, tier="pro", slot_caps=SlotCaps(), total_cap=1_000_000,
                          updated_at=T0, memory_store=store)


def _note(run: RunContext, i: int) -> Any:
    if i == EDITOR:
        return run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "Ada drafts memos in emacs",
                                    confidence=0.9, subject="ada", attribute="editor", value="emacs", at=at(i))
    if i == NOTES - 1:
        return run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "Ada switched to vim for memos",
                                    confidence=0.9, subject="ada", attribute="editor", value="vim", at=at(i))
    return run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, f"Prefers notebook colour {i:02d}",
                                confidence=0.9, at=at(i))


@dataclass
class World:
    settings: Settings
    worker: WorkerProcess
    notes: list[Any]
    children: dict[str, Any]
    records: list[MemoryRecord]
    verdicts: list[MemoryVerdict]
    invalidations: list[Invalidation]
    decisions: list[Decision]


def _decoded(settings: Settings, topic: str, model: type) -> list[Any]:
    codec = Codec(settings.schema_registry_url)
    return [codec.decode(r.value, model) for r in asyncio.run(read_topics(settings, [topic]))]


def _observe(world: World) -> None:
    s = world.settings
    world.records = _decoded(s, "memory.records", MemoryRecord)
    world.verdicts = _decoded(s, "memory.verdicts", MemoryVerdict)
    world.invalidations = _decoded(s, "invalidations", Invalidation)
    world.decisions = _decoded(s, "decisions", Decision)


@pytest.fixture(scope="module")
def world(shared_deployment: SharedDeployment) -> World:
    settings, worker = shared_deployment.settings, shared_deployment.worker
    run = _ctx(STORE, "run-1")
    parent = _ctx(DELEG, "run-private", privacy=PrivacyMode.NO_RETENTION)
    # Children as a buggy or malicious agent builds them (the SDK's child() would make them no-retention).
    late, child = _ctx(DELEG, "child-late", parent="run-private"), _ctx(DELEG, "child", parent="run-private")
    bob = _ctx(DELEG, "child-bob", user="bob", parent="run-root")
    root = _ctx(DELEG, "run-root")
    # A child built by hand in its parent's session (the SDK's child() gives it one of its own, like ``sdk``'s).
    squatter = _ctx(DELEG, "child-squatter", parent="run-root", session=root.session_id)
    sdk = root.child("researcher", run_id="child-sdk")
    children = {
        "late": late.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "Likes terse replies",
                                      confidence=0.9, at=at(0.5)),
        "child": child.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "Reads mail at 7",
                                        confidence=0.9, at=at(1.5)),
        **{name: run.memory_candidate(MemoryScope.SESSION, MemoryType.FACT, "Invoice 7731 was paid twice",
                                      confidence=0.9, at=at(1.5)) for name, run in (("squatter", squatter),
                                                                                    ("sdk", sdk))},
    }
    notes = [_note(run, i) for i in range(NOTES)]
    publish(settings, [_manifest(STORE, MemoryStore(record_quota=10)), _manifest(DELEG, None),
                       run.started(at=at(0)), parent.started(at=at(0)), root.started(at=at(0))])
    # Judged before its run's start says it is a no-retention parent's child: accepted, for now.
    publish(settings, [children["late"]])
    wait_processed(settings)
    publish(settings, [late.started(at=at(1)), child.started(at=at(1)), bob.started(at=at(1)),
                       squatter.started(at=at(1)), sdk.started(at=at(1))])
    wait_processed(settings)
    publish(settings, [*notes, children["child"], children["squatter"], children["sdk"]])
    wait_processed(settings)
    w = World(settings, worker, notes, children, [], [], [], [])
    _observe(w)
    return w


def _verdict(world: World, sent: Any) -> MemoryVerdict:
    (found,) = {v.verdict_id: v for v in world.verdicts if v.candidate_id == sent.candidate_id}.values()
    return found


def _latest(world: World, tenant: str) -> dict[str, MemoryRecord]:
    return {r.memory_id: r for r in world.records if r.tenant_id == tenant}


def test_a_full_store_evicts_its_oldest_records_to_seven_live_archived_first(world: World) -> None:
    ids = [_verdict(world, note).memory_id for note in world.notes]
    assert all(_verdict(world, note).outcome.value == "accepted" for note in world.notes)
    latest = _latest(world, STORE)
    statuses = {mid: latest[mid].status for mid in ids}
    # 9 live -> 7 (notes 0 and 1 go), 8, 9 -> 7 (2 and 3), then the last supersedes note 4: still 7.
    archived = [mid for mid in ids if statuses[mid] is MemoryStatus.ARCHIVED]
    assert archived == ids[:4]
    assert statuses[ids[EDITOR]] is MemoryStatus.SUPERSEDED
    assert sum(s is MemoryStatus.ACTIVE for s in statuses.values()) == 7
    store = LocalPayloadStore(world.settings.payload_root)
    for mid in archived:
        record = latest[mid]
        assert record.content is None and record.archive_ref is not None
        was = MemoryRecord.model_validate_json(store.get(record.archive_ref))
        assert (was.memory_id, was.status, was.version + 1) == (mid, MemoryStatus.ACTIVE, record.version)
        assert was.content == world.notes[ids.index(mid)].content  # the content, kept in the archive only
    rows = world.worker.query(
        f"SELECT count(), min(reason), max(reason) FROM invalidations FINAL WHERE tenant_id = '{STORE}' "
        "AND startsWith(reason, 'store_quota') AND target_type = 'memory_record' GROUP BY tenant_id").rows
    assert [tuple(r[:1]) for r in rows] == [(4,)]
    assert rows[0][1] == rows[0][2] == "store_quota: evicted 2 of 9 live records (quota 10, evict at 9, down to 7)"
    counted = dict(world.worker.query(
        f"SELECT status, count() FROM memory_records FINAL WHERE tenant_id = '{STORE}' GROUP BY status").rows)
    assert counted == {"active": 7, "archived": 4, "superseded": 1}


def test_rehydrate_brings_an_evicted_record_back_as_it_was(world: World) -> None:
    mid = _verdict(world, world.notes[1]).memory_id
    archived = _latest(world, STORE)[mid]
    env = {**os.environ, **settings_env(world.settings)}
    done = subprocess.run(
        [sys.executable, "-m", "ctxflow.streams.cli", "memory", "rehydrate", "--tenant", STORE, "--id", mid,
         "--by", "ops"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    wait_processed(world.settings)
    _observe(world)
    back = _latest(world, STORE)[mid]
    was = MemoryRecord.model_validate_json(LocalPayloadStore(world.settings.payload_root).get(archived.archive_ref))
    assert (back.status, back.version, back.content, back.archive_ref) == (
        MemoryStatus.ACTIVE, archived.version + 1, was.content, None)
    kept = {"status", "version", "updated_at", "reason", "archive_ref"}
    assert back.model_dump(exclude=kept) == was.model_dump(exclude=kept)
    status = world.worker.scalar(
        f"SELECT status FROM memory_records FINAL WHERE tenant_id = '{STORE}' AND memory_id = '{mid}'")
    assert status == "active"


def test_delegation_violations_are_rejections_and_the_children_stay_no_retention(world: World) -> None:
    rejected = {d.run_id: d.reason for d in world.decisions
                if d.tenant_id == DELEG and d.kind is DecisionKind.REJECTION}
    assert set(rejected) == {"child-late", "child", "child-bob", "child-squatter"}  # not the SDK's child-sdk
    assert rejected["child"].startswith("delegation_privacy_downgrade")
    assert rejected["child-bob"].startswith("delegation_other_user")
    assert rejected["child-squatter"].startswith("delegation_shared_session")
    # The squatter's session note would have landed in its parent's session memory: refused. The SDK child's is
    # the same note in a session of its own: kept there, owned by that session.
    squatted = _verdict(world, world.children["squatter"])
    assert (squatted.outcome.value, squatted.rule) == ("rejected", "delegation_shared_session")
    kept = _verdict(world, world.children["sdk"])
    assert (kept.outcome.value, kept.rule) == ("accepted", "session_memory")
    record = _latest(world, DELEG)[kept.memory_id]
    assert (record.scope, record.owner_id, record.status) == (
        MemoryScope.SESSION, "s-run-root/child-sdk", MemoryStatus.ACTIVE)
    assert not [r for r in world.records if r.tenant_id == DELEG and r.owner_id == "s-run-root"]
    verdict = _verdict(world, world.children["child"])
    assert (verdict.outcome.value, verdict.rule) == ("rejected", "no_retention_run")
    # Accepted before its start was known, revoked when it was: a tombstone and its invalidation.
    late = _verdict(world, world.children["late"])
    assert late.outcome.value == "accepted"
    tomb = _latest(world, DELEG)[late.memory_id]
    assert (tomb.status, tomb.content) == (MemoryStatus.REVOKED, None)
    assert tomb.reason is not None and tomb.reason.startswith("no_retention_run: run child-late")
    assert any(i.target_id == late.memory_id and i.kind.value == "tombstone" for i in world.invalidations)
    rows = world.worker.query(
        f"SELECT run_id, kind FROM decisions FINAL WHERE tenant_id = '{DELEG}' AND kind = 'rejection' "
        "ORDER BY run_id").rows
    assert [tuple(r) for r in rows] == [("child", "rejection"), ("child-bob", "rejection"),
                                        ("child-late", "rejection"), ("child-squatter", "rejection")]
    verdicts = world.worker.query(
        f"SELECT run_id, rule FROM memory_verdicts FINAL WHERE tenant_id = '{DELEG}' "
        "AND rule = 'delegation_shared_session'").rows
    assert [tuple(r) for r in verdicts] == [("child-squatter", "delegation_shared_session")]
