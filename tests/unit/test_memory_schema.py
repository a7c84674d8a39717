"""Memory schema evolution (issue 15): old producers keep working, old consumers fail safe on new symbols."""

from __future__ import annotations

from datetime import timedelta

from ctxflow.processors.memory.policy import MemoryPolicy, policy_from_manifest
from ctxflow.processors.memory.processor import MemoryGateProcessor
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas import Codec, content_digest
from ctxflow.schemas.models import (
    MemoryCandidate,
    MemoryGovernance,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryType,
    Sensitivity,
    SlotCaps,
    TenantManifest,
    VerdictOutcome,
    Verification,
)

from tests.support_memory import NOW, candidate, shared_gate


def test_a_v1_candidate_reads_as_unverified_without_subject_or_provenance() -> None:
    v1 = candidate("Prefers answers in French")
    data = Codec(writer_versions={"MemoryCandidate": 1}).encode(v1)
    decoded = Codec().decode(data, MemoryCandidate)
    assert (decoded.subject, decoded.attribute, decoded.value, decoded.verification) == (
        None, None, None, Verification.NONE)
    assert (decoded.parent_run_id, decoded.produced_by_agent, decoded.retention_rule) == (None, None, None)
    assert decoded.content == v1.content


def test_a_v2_candidate_round_trips_its_evidence_and_provenance() -> None:
    c = candidate("Invoices are due in 30 days", scope=MemoryScope.TENANT, type=MemoryType.FACT, subject="invoices",
                  attribute="due", value="30 days", verification=Verification.CORROBORATED,
                  corroborating_run_ids=["r-7", "r-8"], parent_run_id="r-0", produced_by_agent="researcher")
    codec = Codec()
    assert codec.decode(codec.encode(c), MemoryCandidate) == c


def test_an_old_reader_sees_a_superseded_record_as_quarantined_and_never_serves_it() -> None:
    record = MemoryRecord(
        memory_id="mem-1", tenant_id="acme", scope=MemoryScope.TENANT, type=MemoryType.FACT,
        status=MemoryStatus.SUPERSEDED, version=3, content="Alice works in CET",
        content_digest=content_digest("Alice works in CET"), created_at=NOW, updated_at=NOW,
        sensitivity=Sensitivity.PII, superseded_by="mem-2",
    )
    data = Codec().encode(record)
    old = Codec(reader_versions={"MemoryRecord": 1}).decode(data, MemoryRecord)
    assert old.status is MemoryStatus.QUARANTINED
    assert Codec().decode(data, MemoryRecord) == record


def _manifest(**overrides: object) -> TenantManifest:
    fields: dict[str, object] = {"tenant_id": "acme", "version": 3, "tier": "standard", "slot_caps": SlotCaps(),
                                 "total_cap": 100_000, "updated_at": NOW}
    fields.update(overrides)
    return TenantManifest(**fields)


def test_a_v3_manifest_reads_with_default_memory_settings() -> None:
    data = Codec(writer_versions={"TenantManifest": 3}).encode(_manifest())
    decoded = Codec().decode(data, TenantManifest)
    assert decoded.memory is None
    assert policy_from_manifest(decoded) == MemoryPolicy()


def test_the_manifest_states_the_gate_policy_and_its_bootstrap_reaches_the_verdict() -> None:
    manifest = _manifest(memory=MemoryGovernance(retention_rules=["pii-30d"], trusted_systems=["crm"],
                                                 approvers=["ops-lead"], bootstrap_until=NOW + timedelta(days=14)))
    codec = Codec()
    assert codec.decode(codec.encode(manifest), TenantManifest) == manifest
    policy = policy_from_manifest(manifest)
    assert (policy.retention_rules, policy.trusted_systems, policy.approvers, policy.version) == (
        frozenset({"pii-30d"}), frozenset({"crm"}), frozenset({"ops-lead"}), "memory-gate/1@manifest-3")
    # A v5 manifest (before approvers) reads with nobody listed: any named approver, as it was.
    v5 = Codec().decode(Codec(writer_versions={"TenantManifest": 5}).encode(manifest), TenantManifest)
    assert v5.memory is not None and v5.memory.approvers == [] and v5.memory.trusted_systems == ["crm"]
    fact = candidate("The Berlin office closes at 18:00", scope=MemoryScope.TENANT, type=MemoryType.FACT)
    processor = MemoryGateProcessor(shared_gate(), lambda tenant: policy_from_manifest(manifest))
    out = processor.process(fact, Position("memory.candidates", 0, 0), DictBudgetState(), NOW)
    verdict = out[-1]
    assert (verdict.outcome, verdict.bootstrap_loosened, verdict.policy_version) == (
        VerdictOutcome.ACCEPTED, True, "memory-gate/1@manifest-3")
