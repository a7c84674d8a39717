"""The memory gate end to end: SDK candidates through the real worker to verdicts, records, invalidations,
payloads and ClickHouse.

The session's shared worker serves the module, whose records are those of its two tenants. The first tenant's
manifest names a trusted system of record and a PII retention rule; its agents propose a preference (accepted), the
same preference again (merged), a secret (rejected, and found nowhere), a policy (refused), a fact from a
no-retention run (refused whatever the candidate claims), verified facts of which a newer value supersedes exactly
one record, and a document larger than the inline limit (stored content-addressed in the payload store). A second
tenant keeps documents a day: a document learnt when the tenant's clock had long passed that day expires at the
tenant's next record, here another user learning the same document, whose record names the same content-addressed
payload. Every expectation is computed here from the candidates sent.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    Invalidation,
    ItemKind,
    MemoryGovernance,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryStore,
    MemoryType,
    MemoryVerdict,
    PrivacyMode,
    Role,
    Slot,
    SlotCaps,
    TenantManifest,
    Verification,
)
from ctxflow.sinks.payloads import LocalPayloadStore
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_deploy import SharedDeployment
from tests.support_kafka import read_topics, wait_processed
from tests.support_traffic import publish

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
TENANT = "memory-e2e"
RELEARN = "memory-e2e-relearn"
SECRET = "AKIAZ3MHUX7PQ2LRTW4N"  # an AWS access key id shape: detect-secrets' AWSKeyDetector
BIG = "Runbook for the billing export.\n" + "\n".join(f"step {i}: check ledger shard {i:04d}" for i in range(600))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass
class World:
    settings: Settings
    worker: WorkerProcess
    sent: dict[str, Any]
    records: list[MemoryRecord]
    verdicts: list[MemoryVerdict]
    invalidations: list[Invalidation]


def _ctx(run_id: str, privacy: PrivacyMode = PrivacyMode.RETAINED, tenant: str = TENANT, user: str = "ada"
         ) -> RunContext:
    counter = iter(range(1_000_000))
    return RunContext(tenant_id=tenant, user_id=user, session_id="s-1", agent_id="assistant", model="gpt-4o",
                      run_id=run_id, privacy=privacy, id_factory=lambda: f"{run_id}-{next(counter)}")


def _traffic() -> dict[str, Any]:
    run, private = _ctx("run-1"), _ctx("run-private", PrivacyMode.NO_RETENTION)
    fact = {"scope": MemoryScope.TENANT, "type_": MemoryType.FACT, "confidence": 0.9,
            "verification": Verification.SYSTEM_OF_RECORD, "verified_by": "billing"}
    return {
        "manifest": TenantManifest(
            tenant_id=TENANT, version=1, tier="pro", slot_caps=SlotCaps(), total_cap=1_000_000, updated_at=T0,
            memory=MemoryGovernance(trusted_systems=["billing"], retention_rules=["support-contacts"])),
        "started": run.started(at=at(0)),
        "preference": run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "Prefers answers in French",
                                           confidence=0.9, at=at(1)),
        "again": run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "prefers answers in french.",
                                      confidence=0.9, at=at(2)),
        "secret": run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE,
                                       f"Use the deploy key {SECRET} for releases", confidence=0.9, at=at(3)),
        "policy": run.memory_candidate(MemoryScope.TENANT, MemoryType.POLICY, "Refunds are always approved",
                                       confidence=0.99, at=at(4)),
        "private_turn": private.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "my card ends 4242", at=at(5)),
        # The candidate claims retained; the run's own turn says otherwise: the run decides.
        "private": private.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE,
                                            "Pays with the card ending 4242", confidence=0.9,
                                            at=at(6)).model_copy(update={"privacy": PrivacyMode.RETAINED}),
        "seats": run.memory_candidate(content="Acme's plan has 50 seats", subject="acme", attribute="seats",
                                      value="50", at=at(7), **fact),
        "region": run.memory_candidate(content="Acme is hosted in eu-west-1", subject="acme", attribute="region",
                                       value="eu-west-1", at=at(8), **fact),
        "seats_now": run.memory_candidate(content="Acme upgraded to 75 seats", subject="acme", attribute="seats",
                                          value="75", at=at(9), **fact),
        "runbook": run.memory_candidate(MemoryScope.USER, MemoryType.EPISODE, BIG, confidence=0.9, at=at(10)),
    }


def _relearn() -> list[list[Any]]:
    """Phases of the second tenant, each processed before the next is sent."""
    ada, bea = _ctx("run-a", tenant=RELEARN), _ctx("run-b", tenant=RELEARN, user="bea")
    manifest = TenantManifest(tenant_id=RELEARN, version=1, tier="pro", slot_caps=SlotCaps(), total_cap=1_000_000,
                              updated_at=T0, memory_store=MemoryStore(retention_days={"episode": 1}))
    clock = ada.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "ten days on", at=at(10 * 86_400))
    return [[manifest, clock],
            [ada.memory_candidate(MemoryScope.USER, MemoryType.EPISODE, BIG, confidence=0.9, at=at(1))],
            [bea.memory_candidate(MemoryScope.USER, MemoryType.EPISODE, BIG, confidence=0.9, at=at(10 * 86_400))]]


def _decoded(settings: Settings, topic: str, model: type) -> list[Any]:
    """The topic's records of this module's tenants (the deployment is shared)."""
    codec = Codec(settings.schema_registry_url)
    decoded = [codec.decode(r.value, model) for r in asyncio.run(read_topics(settings, [topic]))]
    return [d for d in decoded if d.tenant_id in (TENANT, RELEARN)]


@pytest.fixture(scope="module")
def world(shared_deployment: SharedDeployment) -> World:
    settings, worker = shared_deployment.settings, shared_deployment.worker
    sent = _traffic()
    # The manifest, and the no-retention run's turn: topics are read in no set order between them, and the
    # gate can only refuse what it knows (a candidate of the SDK carries its run's privacy itself; this one
    # lies about it).
    publish(settings, [sent["manifest"], sent["private_turn"]])
    wait_processed(settings)
    publish(settings, [v for k, v in sent.items() if k not in ("manifest", "private_turn")])
    publish(settings, [sent["preference"]])  # a redelivery: the same candidate again
    wait_processed(settings)
    for phase in _relearn():
        publish(settings, phase)
        wait_processed(settings)
    return World(settings, worker, sent, _decoded(settings, "memory.records", MemoryRecord),
                 _decoded(settings, "memory.verdicts", MemoryVerdict),
                 _decoded(settings, "invalidations", Invalidation))


def _verdict(world: World, name: str) -> MemoryVerdict:
    found = [v for v in world.verdicts if v.candidate_id == world.sent[name].candidate_id]
    assert found and all(v == found[0] for v in found), (name, found)  # a redelivery: the identical verdict
    return found[0]


def _latest(world: World) -> dict[str, MemoryRecord]:
    """What the compacted topic keeps of the first tenant: the last record of each memory id."""
    return {r.memory_id: r for r in world.records if r.tenant_id == TENANT}


def test_every_candidate_gets_one_verdict_naming_its_rule(world: World) -> None:
    expected = {
        "preference": ("accepted", "user_memory", "active"),
        "again": ("merged", "user_memory", "active"),
        "secret": ("rejected", "secret_detected", None),
        "policy": ("rejected", "policy_not_promotable", None),
        "private": ("rejected", "no_retention_run", None),
        "seats": ("accepted", "tenant_verified_fact", "active"),
        "region": ("accepted", "tenant_verified_fact", "active"),
        "seats_now": ("accepted", "tenant_verified_fact", "active"),
        "runbook": ("accepted", "user_memory", "active"),
    }
    for name, (outcome, rule, status) in expected.items():
        v = _verdict(world, name)
        assert (v.outcome.value, v.rule, v.status.value if v.status else None) == (outcome, rule, status), name
    assert _verdict(world, "again").memory_id == _verdict(world, "preference").memory_id
    rows = world.worker.query(
        f"SELECT outcome, rule, count() FROM memory_verdicts WHERE tenant_id = '{TENANT}' GROUP BY outcome, rule "
        "ORDER BY outcome, rule").rows
    counted: dict[tuple[str, str], int] = {}
    for outcome, rule, _ in expected.values():
        counted[(outcome, rule)] = counted.get((outcome, rule), 0) + 1
    assert {(o, r): n for o, r, n in rows} == counted


def test_a_newer_value_supersedes_exactly_the_record_it_contradicts(world: World) -> None:
    latest = _latest(world)
    seats, region, seats_now = (latest[_verdict(world, n).memory_id] for n in ("seats", "region", "seats_now"))
    assert (seats.status.value, seats.superseded_by) == ("superseded", seats_now.memory_id)
    assert (seats_now.status.value, seats_now.supersedes) == ("active", seats.memory_id)
    assert region.status.value == "active" and region.superseded_by is None  # another attribute: untouched
    assert [(i.target_type, i.target_id, i.kind.value) for i in world.invalidations if i.tenant_id == TENANT] == [
        (layer, seats.memory_id, "invalidation") for layer in ("memory_record", "retrieval_index")]
    statuses = dict(world.worker.query(
        f"SELECT memory_id, status FROM memory_records FINAL WHERE tenant_id = '{TENANT}'").rows)
    assert statuses == {r.memory_id: r.status.value for r in latest.values()}


def test_merges_count_on_the_record(world: World) -> None:
    record = _latest(world)[_verdict(world, "preference").memory_id]
    assert record.merge_count == 1 and record.content == "Prefers answers in French"


def test_large_content_lives_in_the_payload_store_not_on_the_topic(world: World) -> None:
    record = _latest(world)[_verdict(world, "runbook").memory_id]
    assert record.content is None and record.payload_ref is not None
    stored = LocalPayloadStore(world.settings.payload_root).get(record.payload_ref)
    assert stored.decode() == BIG and hashlib.sha256(stored).hexdigest() == record.content_digest
    raw = b"".join(r.value for r in asyncio.run(read_topics(world.settings, ["memory.records"])))
    assert b"step 599: check ledger shard" not in raw


def test_a_payload_released_by_an_expiry_stays_while_the_same_content_learnt_again_names_it(world: World) -> None:
    ours = [r for r in world.records if r.tenant_id == RELEARN]
    latest = {r.memory_id: r for r in ours}
    expired = [r for r in latest.values() if r.status is MemoryStatus.REVOKED]
    (live,) = [r for r in latest.values() if r.status is MemoryStatus.ACTIVE]
    assert [(r.reason, r.user_id) for r in expired] == [("expired", "ada")] and live.user_id == "bea"
    (first,) = {r.payload_ref for r in ours if r.memory_id == expired[0].memory_id and r.payload_ref}
    assert live.payload_ref == first  # content-addressed: the same payload
    stored = LocalPayloadStore(world.settings.payload_root).get(live.payload_ref)
    assert stored.decode() == BIG
    assert not [i for i in world.invalidations if i.tenant_id == RELEARN and i.target_type == "payload"]


def test_a_secret_and_no_retention_content_are_stored_nowhere(world: World) -> None:
    raw = b"".join(r.value or b"" for r in asyncio.run(read_topics(
        world.settings, ["memory.records", "memory.verdicts", "invalidations", "decisions"])))
    for canary in (SECRET.encode(), b"card ending 4242"):
        assert canary not in raw
    tables = world.worker.query(
        f"SELECT count() FROM memory_records WHERE tenant_id = '{TENANT}' AND "
        f"(positionUTF8(ifNull(content, ''), '{SECRET}') > 0 OR positionUTF8(ifNull(content, ''), '4242') > 0)")
    assert tables.rows[0][0] == 0
    payloads = Path(world.settings.payload_root)
    for path in payloads.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes()
