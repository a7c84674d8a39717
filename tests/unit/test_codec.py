"""The codec: round trips of every record, the single-object wire format and every rejection path."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

import pytest
from ctxflow.schemas import (
    MODEL_SCHEMAS,
    Codec,
    ContractViolation,
    RegistryUnavailable,
    Undecodable,
    UnknownSchema,
    content_digest,
    kept_schemas,
)
from ctxflow.schemas.models import (
    TENANT_ID_PATTERN,
    AdmissionRequest,
    BudgetState,
    CompressionJob,
    CompressionSource,
    CostLine,
    DeadLetter,
    Decision,
    DecisionKind,
    Invalidation,
    InvalidationKind,
    ItemAction,
    ItemDecision,
    ItemKind,
    MemoryCandidate,
    MemoryCommand,
    MemoryCommandKind,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryType,
    MemoryVerdict,
    PrivacyMode,
    ReviewAction,
    ReviewState,
    Role,
    RunEnvelope,
    RunEvent,
    RunPhase,
    RunStatus,
    Sensitivity,
    Slot,
    SlotCaps,
    SpendWindow,
    SpendWindowKind,
    Summary,
    SummaryProvenance,
    TenantManifest,
    TurnEvent,
    UsageReport,
    UserOverride,
    VerdictOutcome,
    Verification,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

NOW = datetime(2026, 3, 1, 12, 30, 15, 123000, tzinfo=UTC)
IDS = {"tenant_id": "acme", "user_id": "u-1", "session_id": "s-1", "run_id": "r-1", "agent_id": "planner"}
TEXT = "Summarise the quarterly report; keep the tenant's tone policy."


def turn(**overrides: object) -> TurnEvent:
    fields: dict[str, object] = {
        **IDS,
        "event_id": "e-1",
        "seq": 7,
        "role": Role.TOOL,
        "kind": ItemKind.TOOL_RESULT,
        "slot": Slot.HISTORY,
        "item_id": "i-1",
        "content": TEXT,
        "content_digest": content_digest(TEXT),
        "token_count": 14,
        "model": "gpt-4o",
        "importance": 0.75,
        "tier_hint": 1,
        "embedding": [0.5, -1.25],
        "occurred_at": NOW,
        "parent_run_id": "r-0",
        "tool_call_id": "call-9",
        "relevance": 0.5,
    }
    fields.update(overrides)
    return TurnEvent(**fields)


SAMPLES: list[BaseModel] = [
    turn(),
    UsageReport(
        **IDS,
        event_id="e-2",
        call_id="c-1",
        provider="openai",
        model="gpt-4o",
        input_tokens=900,
        output_tokens=120,
        cached_read_tokens=512,
        reasoning_tokens=40,
        latency_ms=830,
        streamed=True,
        complete=False,
        occurred_at=NOW,
    ),
    RunEvent(
        **IDS,
        event_id="e-3",
        parent_run_id="r-0",
        workflow_id="r-0",
        phase=RunPhase.FINALIZED,
        status=RunStatus.CANCELLED,
        policy_version="p7",
        prefix_hash="ab12",
        model="gpt-4o",
        privacy=PrivacyMode.NO_RETENTION,
        occurred_at=NOW,
    ),
    AdmissionRequest(
        **IDS,
        request_id="q-1",
        model="gpt-4o",
        planned={Slot.SYSTEM: 800, Slot.HISTORY: 4000},
        requested_at=NOW,
    ),
    TenantManifest(
        tenant_id="acme",
        version=3,
        tier="enterprise",
        slot_caps=SlotCaps(system=2000, output=None),
        total_cap=128_000,
        soft_watermark=0.8,
        spend_windows=[SpendWindow(window=SpendWindowKind.DAY, max_tokens=10**9, max_cost_micros=5_000_000)],
        run_cap_tokens=200_000,
        subagent_share=0.25,
        tokenizers={"gpt-4o": "o200k_base"},
        user_overrides={
            "u-1": UserOverride(
                total_cap=64_000, spend_windows=[SpendWindow(window=SpendWindowKind.HOUR, max_tokens=5)]
            )
        },
        updated_at=NOW,
        updated_by="ops",
    ),
    MemoryCandidate(
        **IDS,
        event_id="e-4",
        candidate_id="m-c",
        scope=MemoryScope.USER,
        type=MemoryType.PREFERENCE,
        content=TEXT,
        content_digest=content_digest(TEXT),
        source_item_ids=["i-1", "i-2"],
        confidence=0.9,
        occurred_at=NOW,
    ),
    MemoryRecord(
        memory_id="m-1",
        tenant_id="acme",
        user_id="u-1",
        scope=MemoryScope.USER,
        type=MemoryType.FACT,
        status=MemoryStatus.REVOKED,
        version=2,
        content=None,
        content_digest=content_digest(TEXT),
        source_run_id="r-1",
        created_at=NOW,
        updated_at=NOW + timedelta(days=1),
        expires_at=NOW + timedelta(days=30),
        reason="user deleted",
    ),
    # Memory governance (issue 15): the v2 fields and the verdict.
    MemoryCandidate(
        **IDS,
        event_id="e-5",
        candidate_id="m-c2",
        scope=MemoryScope.TENANT,
        type=MemoryType.FACT,
        content="The Berlin office's timezone is CET",
        content_digest=content_digest("The Berlin office's timezone is CET"),
        confidence=0.8,
        occurred_at=NOW,
        subject="office:berlin",
        attribute="timezone",
        value="CET",
        verification=Verification.CORROBORATED,
        corroborating_run_ids=["r-7", "r-8"],
        parent_run_id="r-0",
        produced_by_agent="researcher",
        retention_rule="pii-30d",
    ),
    MemoryRecord(
        memory_id="m-2",
        tenant_id="acme",
        scope=MemoryScope.TENANT,
        type=MemoryType.FACT,
        status=MemoryStatus.SUPERSEDED,
        version=3,
        content=None,
        content_digest=content_digest(TEXT),
        created_at=NOW,
        updated_at=NOW,
        subject="office:berlin",
        attribute="timezone",
        value="CET",
        verification=Verification.HUMAN_APPROVED,
        sensitivity=Sensitivity.PII,
        pii_kinds=["EMAIL_ADDRESS"],
        retention_policy="pii-30d",
        policy_version="memory-gate/1",
        payload_ref="sha256/ab/cd",
        superseded_by="m-3",
        review_state=ReviewState.REINSTATED,
        merge_count=2,
        bootstrap_loosened=True,
    ),
    MemoryCommand(
        command_id="cmd-1", tenant_id="acme", kind=MemoryCommandKind.REVIEW, memory_id="m-2",
        action=ReviewAction.CORRECT, corrected_content="Acme has 75 seats", corrected_value="75",
        issued_by="reviewer-ana", reason="billing confirmed", issued_at=NOW,
    ),
    MemoryVerdict(
        tenant_id="acme",
        user_id="u-1",
        session_id="s-1",
        run_id="r-1",
        verdict_id="v-1",
        candidate_id="m-c2",
        source_event_id="e-5",
        outcome=VerdictOutcome.ACCEPTED,
        status=MemoryStatus.PROVISIONAL,
        rule="tenant_verified_fact",
        reason="corroborated by 2 independent runs",
        memory_id="m-2",
        scope=MemoryScope.TENANT,
        type=MemoryType.FACT,
        pii_kinds=["PHONE_NUMBER"],
        policy_version="memory-gate/1",
        parent_run_id="r-0",
        occurred_at=NOW,
    ),
    Decision(
        decision_id="d-1",
        tenant_id="acme",
        run_id="r-1",
        kind=DecisionKind.EVICTION_REQUEST,
        slot=Slot.HISTORY,
        state=BudgetState.SOFT,
        previous_state=BudgetState.OK,
        used_tokens=110_000,
        cap_tokens=128_000,
        window=SpendWindowKind.DAY,
        admitted=None,
        reason="soft watermark crossed",
        actions=[ItemDecision(item_id="i-1", action=ItemAction.COMPRESS, tokens=900)],
        source_event_id="e-1",
        manifest_version=3,
        decided_at=NOW,
    ),
    Decision(
        decision_id="d-2",
        tenant_id="acme",
        run_id="r-1",
        kind=DecisionKind.SWAP,
        slot=Slot.HISTORY,
        reason="summary of 3 oldest history items swapped in",
        actions=[ItemDecision(item_id="i-1", action=ItemAction.SWAP, tokens=900)],
        source_event_id="e-1",
        decided_at=NOW,
        strategy="hybrid",
        policy_version="m3/p1",
        tokens_freed=700,
        summary=SummaryProvenance(
            summary_id="sum-1", text="user: deploy to eu-west-1 by 2026-03-14", token_count=200,
            source_ids=["i-1"], source_digests=[content_digest(TEXT)], summarizer="extractive",
            summarizer_version="1", depth=1, fidelity=0.75,
        ),
        cost_effect_micros=-120,
        job_id="job-1",
    ),
    CompressionJob(
        job_id="job-1", tenant_id="acme", user_id="u", session_id="s", run_id="r-1", slot=Slot.HISTORY,
        sources=[CompressionSource(item_id="i-1", content_digest=content_digest(TEXT), tokens=900, depth=0,
                                   topic="turns", partition=0, offset=17, label="tool result")],
        max_tokens=270, policy_version="m3/p1", model="gpt-4o", requested_at=NOW,
    ),
    Summary(
        summary_id="sum-1", job_id="job-1", tenant_id="acme", user_id="u", session_id="s", run_id="r-1",
        slot=Slot.HISTORY, text="user: deploy to eu-west-1", token_count=9, source_ids=["i-1"],
        source_digests=[content_digest(TEXT)], summarizer="extractive", summarizer_version="1", depth=1,
        fidelity=1.0, produced_at=NOW,
    ),
    Invalidation(
        invalidation_id="v-1",
        tenant_id="acme",
        kind=InvalidationKind.TOMBSTONE,
        target_type="memory_record",
        target_id="m-1",
        source_memory_id="m-1",
        reason="revoked",
        occurred_at=NOW,
    ),
    DeadLetter(
        dead_letter_id="dl-1",
        source_topic="ctxflow.turns",
        source_partition=2,
        source_offset=991,
        tenant_id="acme",
        reason_code="contract_violation",
        reason="TurnEvent.seq: negative",
        original=b"\xc3\x01garbage",
        failed_at=NOW,
    ),
    RunEnvelope(
        tenant_id="acme", user_id="u", session_id="s", run_id="r-2", parent_run_id="r-1", root_run_id="r-1",
        workflow_id="r-1", agent_id="researcher", depth=1, policy_version="p7", prefix_hash="ab12", model="gpt-4o",
        status="abandoned", closed_by="idle_timeout", started_at=NOW, finalized_at=NOW + timedelta(minutes=31),
        last_event_at=NOW + timedelta(minutes=1), duration_ms=1_860_000, global_tokens=0, tenant_tokens=120,
        user_tokens=40, retrieved_tokens=300, session_tokens=900, static_prefix_tokens=120, dynamic_tokens=1240,
        input_tokens=800, output_tokens=90, cached_read_tokens=400, cache_write_tokens=0, reasoning_tokens=0,
        usage_estimated=True, retrievals=3, memory_ids=["m-1"], tool_calls=2, tool_results=2,
        promotions={"user": 1}, evictions=4, compressions=1, tokens_freed=650, cost_micros=5210,
        inference_micros=5000, retrieval_micros=150, tooling_micros=60, persistence_micros=0, cost_estimated=True,
        price_version="list-2025-06", event_count=17, integrity_hash=content_digest("chain"), envelope_version=35,
        updated_at=NOW + timedelta(minutes=31), estimated_tokens=460, usage_reports=2,
    ),
    CostLine(
        cost_id="c-1", tenant_id="acme", user_id="u", session_id="s", run_id="r-2", root_run_id="r-1",
        parent_run_id="r-1", workflow_id="r-1", agent_id="researcher", surface="tooling", model=None, quantity=2,
        unit="calls", micros=60, price_version="list-2025-06", estimated=False, source_event_id="e-9",
        occurred_at=NOW,
    ),
]


def test_samples_cover_every_record_type() -> None:
    assert {type(s) for s in SAMPLES} == set(MODEL_SCHEMAS)


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_every_record_type_round_trips_unchanged(record: BaseModel) -> None:
    codec = Codec()
    data = codec.encode(record)
    assert codec.decode(data, type(record)) == record
    assert codec.encode(codec.decode(data, type(record))) == data


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro specification writes it, independent of fastavro."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_crc64_reference_matches_the_avro_published_vectors() -> None:
    assert _crc64_avro(b'"null"') == 7195948357588979594
    assert _crc64_avro(b'"int"') == 8247732601305521295


def test_wire_format_is_avro_single_object_encoding() -> None:
    data = Codec().encode(turn())
    newest = kept_schemas()["TurnEvent"][-1]
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == _crc64_avro(newest.canonical.encode()).to_bytes(8, "little")


def test_unknown_fingerprint_is_rejected_as_unknown_schema() -> None:
    data = bytearray(Codec().encode(turn()))
    data[2:10] = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    with pytest.raises(UnknownSchema, match="0102030405060708") as err:
        Codec().decode(bytes(data), TurnEvent)
    assert err.value.reason_code == "unknown_schema"


def test_record_of_another_type_is_rejected_as_unknown_schema() -> None:
    data = Codec().encode(SAMPLES[1])
    with pytest.raises(UnknownSchema, match=r"expected ctxflow\.TurnEvent.*ctxflow\.UsageReport"):
        Codec().decode(data, TurnEvent)


def test_truncated_record_is_undecodable_but_keeps_its_tenant() -> None:
    data = Codec().encode(turn(privacy=PrivacyMode.NO_RETENTION))
    with pytest.raises(Undecodable, match="truncated or corrupt") as err:
        Codec().decode(data[:60], TurnEvent)
    assert err.value.tenant_id == "acme"
    assert err.value.no_retention is False  # unknowable: the privacy field was never read


@pytest.mark.parametrize("data", [b"", b"\xc3", b"hello world, not avro", bytes(range(255, 0, -1))])
def test_garbage_is_undecodable(data: bytes) -> None:
    with pytest.raises(Undecodable) as err:
        Codec().decode(data, TurnEvent)
    assert err.value.reason_code == "undecodable"
    assert err.value.tenant_id is None


def test_null_value_is_undecodable_not_a_crash() -> None:
    good, rejected = Codec().decode_batch([None], TurnEvent)  # type: ignore[list-item]
    assert not good and rejected[0][1].reason_code == "undecodable"


def test_trailing_bytes_are_undecodable() -> None:
    with pytest.raises(Undecodable, match="3 trailing bytes"):
        Codec().decode(Codec().encode(turn()) + b"abc", TurnEvent)


def test_missing_tenant_is_a_contract_violation_without_tenant() -> None:
    data = Codec().encode(turn().model_copy(update={"tenant_id": ""}))
    with pytest.raises(ContractViolation, match=r"TurnEvent\.tenant_id") as err:
        Codec().decode(data, TurnEvent)
    assert err.value.tenant_id is None


def test_negative_tokens_are_a_contract_violation_naming_field_and_value() -> None:
    data = Codec().encode(turn().model_copy(update={"token_count": -5}))
    with pytest.raises(ContractViolation, match=r"TurnEvent\.token_count: .*greater than or equal to 0.*-5"):
        Codec().decode(data, TurnEvent)


def test_oversized_content_is_rejected_with_size_and_limit() -> None:
    text = "é" * 600  # 600 characters, 1200 UTF-8 bytes
    data = Codec().encode(turn(content=text, content_digest=content_digest(text)))
    with pytest.raises(
        ContractViolation, match=r"TurnEvent\.content is 1200 UTF-8 bytes, over the limit of 1000"
    ):
        Codec(max_content_bytes=1000).decode(data, TurnEvent)
    with pytest.raises(ContractViolation, match="over the limit"):
        Codec(max_content_bytes=1000).encode(turn(content=text, content_digest=None))


def test_contract_violating_no_retention_record_says_not_to_keep_its_bytes() -> None:
    bad = turn(privacy=PrivacyMode.NO_RETENTION).model_copy(update={"seq": -1})
    with pytest.raises(ContractViolation) as err:
        Codec().decode(Codec().encode(bad), TurnEvent)
    assert err.value.no_retention is True
    assert err.value.tenant_id == "acme"
    assert TEXT not in err.value.reason
    with pytest.raises(ContractViolation) as oversized:
        Codec(max_content_bytes=10).decode(Codec().encode(turn(privacy=PrivacyMode.NO_RETENTION)), TurnEvent)
    assert oversized.value.no_retention is True


def test_decode_batch_returns_good_records_in_order_and_indexes_rejects() -> None:
    codec = Codec()
    items = [codec.encode(turn(seq=0)), b"junk", codec.encode(turn(seq=2)), codec.encode(SAMPLES[1])]
    good, rejected = codec.decode_batch(items, TurnEvent)
    assert [e.seq for e in good] == [0, 2]
    assert [(i, e.reason_code) for i, e in rejected] == [(1, "undecodable"), (3, "unknown_schema")]


def test_confluent_framed_record_without_registry_is_unknown_schema() -> None:
    with pytest.raises(UnknownSchema, match="no schema registry"):
        Codec().decode(b"\x00\x00\x00\x00\x07" + b"\x02", TurnEvent)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_unreachable_registry_is_an_outage_not_a_rejection() -> None:
    codec = Codec(registry_url=_closed_port_url())
    with pytest.raises(RegistryUnavailable):
        codec.encode(turn())
    with pytest.raises(RegistryUnavailable):
        codec.decode(b"\x00\x00\x00\x00\x07\x02", TurnEvent)


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
_id = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
_ms = st.integers(min_value=-(2**40), max_value=2**42)


@st.composite
def turns(draw: st.DrawFn) -> TurnEvent:
    content = draw(st.none() | _text)
    if content is None:
        digest: str | None = content_digest(draw(_text))
    else:
        digest = draw(st.sampled_from([None, content_digest(content)]))
    unit = st.none() | st.floats(0.0, 1.0)
    return TurnEvent(
        event_id=draw(_id),
        tenant_id=draw(st.from_regex(TENANT_ID_PATTERN, fullmatch=True)),
        user_id=draw(_id),
        session_id=draw(_id),
        run_id=draw(_id),
        parent_run_id=draw(st.none() | _id),
        agent_id=draw(_id),
        seq=draw(st.integers(0, 2**63 - 1)),
        role=draw(st.sampled_from(Role)),
        kind=draw(st.sampled_from(ItemKind)),
        slot=draw(st.sampled_from(Slot)),
        item_id=draw(_id),
        content=content,
        content_digest=digest,
        token_count=draw(st.none() | st.integers(0, 2**31 - 1)),
        model=draw(_id),
        importance=draw(unit),
        tier_hint=draw(st.none() | st.integers(0, 3)),
        embedding=draw(
            st.none() | st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=8)
        ),
        privacy=draw(st.sampled_from(PrivacyMode)),
        occurred_at=datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=draw(_ms)),
        tool_call_id=draw(st.none() | _id),
        relevance=draw(unit),
    )


@settings(max_examples=300, deadline=None)
@given(turns())
def test_any_valid_turn_event_round_trips_byte_stable(event: TurnEvent) -> None:
    codec = Codec()
    data = codec.encode(event)
    decoded = codec.decode(data, TurnEvent)
    assert decoded == event
    assert codec.encode(decoded) == data
