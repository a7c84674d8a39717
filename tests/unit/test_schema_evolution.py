"""Schema evolution: the rules every new version must follow, and old/new readers and writers interoperating.

fastavro appears here only to play a producer of a *future* schema version, which the codec cannot write.
"""

from __future__ import annotations

import io
import itertools
import json
from datetime import UTC, datetime
from typing import Any

import fastavro
import pytest
from ctxflow.schemas import MODEL_SCHEMAS, Codec, RejectedRecord, UnknownSchema, content_digest, kept_schemas
from ctxflow.schemas.models import (
    ContentFeatures,
    ContextLayer,
    ItemKind,
    MemoryCommand,
    MemoryCommandKind,
    PrivacyMode,
    Role,
    Slot,
    TurnEvent,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def turn(**overrides: Any) -> TurnEvent:
    fields: dict[str, Any] = {
        "event_id": "e-1",
        "tenant_id": "acme",
        "user_id": "u",
        "session_id": "s",
        "run_id": "r",
        "agent_id": "a",
        "seq": 4,
        "role": Role.TOOL,
        "kind": ItemKind.TOOL_RESULT,
        "slot": Slot.HISTORY,
        "item_id": "i",
        "content": "42 rows",
        "model": "gpt-4o",
        "importance": 0.5,
        "occurred_at": NOW,
        "tool_call_id": "call-1",
        "relevance": 0.25,
    }
    fields.update(overrides)
    return TurnEvent(**fields)


def test_every_released_version_is_kept() -> None:
    assert set(kept_schemas()) == set(MODEL_SCHEMAS.values())
    for name, versions in kept_schemas().items():
        assert [v.version for v in versions] == list(range(1, len(versions) + 1)), name
    assert [v.version for v in kept_schemas()["TurnEvent"]] == [1, 2, 3, 4, 5]


def _enums(schema: Any, found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if isinstance(schema, list):
        for branch in schema:
            _enums(branch, found)
    elif isinstance(schema, dict):
        if schema.get("type") == "enum":
            found[schema["name"]] = schema
        for key in ("items", "values"):
            if key in schema:
                _enums(schema[key], found)
        for field in schema.get("fields", []):
            _enums(field["type"], found)
    return found


def _strip(schema: Any) -> Any:
    """A type with docs and enum symbol lists removed, for comparing everything else."""
    if isinstance(schema, list):
        return [_strip(b) for b in schema]
    if isinstance(schema, dict):
        return {k: _strip(v) for k, v in schema.items() if k not in ("doc", "symbols", "default")}
    return schema


def _evolves(old: Any, new: Any, where: str) -> None:
    """``new`` is ``old`` but for nested records that gained fields with defaults (Avro resolves both ways)."""
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for o, n in zip(old, new, strict=True):
            _evolves(o, n, where)
        return
    if isinstance(old, dict) and isinstance(new, dict) and old.get("type") == "record" == new.get("type"):
        old_fields = {f["name"]: f for f in old["fields"]}
        new_fields = {f["name"]: f for f in new["fields"]}
        for added in new_fields.keys() - old_fields.keys():
            assert "default" in new_fields[added], f"{where}.{added} was added without a default"
        for removed in old_fields.keys() - new_fields.keys():
            assert "default" in old_fields[removed], f"{where}.{removed} was removed but old readers need it"
        for field in old_fields.keys() & new_fields.keys():
            _evolves(old_fields[field]["type"], new_fields[field]["type"], f"{where}.{field}")
        return
    assert _strip(old) == _strip(new), where


#: Closed enums that may grow all the same: a record carrying a symbol an older reader does not know is refused by
#: that reader (dead-lettered), which is what an operator's command of an unknown kind must come to.
REFUSED_WHEN_UNKNOWN = frozenset({"MemoryCommandKind", "ReviewAction"})


@pytest.mark.parametrize("name", sorted(kept_schemas()))
def test_consecutive_versions_follow_the_evolution_rules(name: str) -> None:
    versions = [json.loads(v.text) for v in kept_schemas()[name]]
    for old, new in itertools.pairwise(versions):
        _evolves(old, new, name)
        old_enums, new_enums = _enums(old, {}), _enums(new, {})
        for enum_name, old_enum in old_enums.items():
            added_symbols = set(new_enums[enum_name]["symbols"]) - set(old_enum["symbols"])
            assert set(old_enum["symbols"]) <= set(new_enums[enum_name]["symbols"]), (
                f"{enum_name} lost symbols"
            )
            assert not added_symbols or "default" in old_enum or enum_name in REFUSED_WHEN_UNKNOWN, (
                f"{enum_name} grew but old readers have no default"
            )


def test_closed_enums_are_exactly_the_ones_where_a_default_would_be_wrong() -> None:
    enums: dict[str, dict[str, Any]] = {}
    for name in MODEL_SCHEMAS.values():
        _enums(json.loads(kept_schemas()[name][-1].text), enums)
    assert {n for n, e in enums.items() if "default" not in e} == {
        "RunPhase",
        "SpendWindowKind",
        "MemoryScope",
        # An operator's command of a kind or action this reader does not know is refused, never misapplied.
        "MemoryCommandKind",
        "ReviewAction",
    }
    assert enums["PrivacyMode"]["default"] == "no_retention"  # an unknown privacy mode fails closed


@pytest.mark.parametrize("writer", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("reader", [1, 2, 3, 4, 5])
def test_every_kept_turn_version_reads_under_every_kept_reader(writer: int, reader: int) -> None:
    features = ContentFeatures(version=1, term_digests=bytes(range(8)), terms=3, goal=True, constraint=False,
                               decision=True)
    event = turn(tool_call_ids=["call-1", "call-2"], layer=ContextLayer.TENANT, features=features)
    data = Codec(writer_versions={"TurnEvent": writer}).encode(event)
    decoded = Codec(reader_versions={"TurnEvent": reader}).decode(data, TurnEvent)
    # What the older of the two versions lacks reads as its default.
    lost: dict[str, object] = {}
    if min(writer, reader) < 5:
        lost["features"] = None
    if min(writer, reader) < 4:
        lost["layer"] = None
    if min(writer, reader) < 3:
        lost["tool_call_ids"] = []
    if min(writer, reader) < 2:
        lost.update(tool_call_id=None, relevance=None)
    assert decoded == event.model_copy(update=lost)


def test_v1_producer_bytes_read_by_the_newest_consumer_get_v2_defaults() -> None:
    data = Codec(writer_versions={"TurnEvent": 1}).encode(turn())
    assert data[2:10] == kept_schemas()["TurnEvent"][0].fingerprint
    decoded = Codec().decode(data, TurnEvent)
    assert (decoded.tool_call_id, decoded.relevance, decoded.seq) == (None, None, 4)


@pytest.mark.parametrize(("writer", "reader"), [(1, 2), (2, 1)])
def test_codec_agrees_with_plain_avro_resolution(writer: int, reader: int) -> None:
    """The codec skips fastavro's per-record resolution when versions differ only by defaulted fields."""
    data = Codec(writer_versions={"TurnEvent": writer}).encode(turn())
    body = io.BytesIO(data[10:])
    resolved = fastavro.schemaless_reader(
        body, kept_schemas()["TurnEvent"][writer - 1].parsed, kept_schemas()["TurnEvent"][reader - 1].parsed
    )
    decoded = Codec(reader_versions={"TurnEvent": reader}).decode(data, TurnEvent)
    assert decoded == TurnEvent.model_validate(resolved)


def _future_turn_schema() -> dict[str, Any]:
    schema = json.loads(kept_schemas()["TurnEvent"][-1].text)
    for field in schema["fields"]:
        if field["name"] == "role":
            field["type"]["symbols"].append("developer")
        if field["name"] == "privacy":
            field["type"]["symbols"].append("ephemeral")
    schema["fields"].append({"name": "cost_micros", "type": "long", "default": 0})
    return schema


def test_a_future_writer_is_unknown_to_a_single_object_reader_that_does_not_keep_it() -> None:
    schema = fastavro.parse_schema(_future_turn_schema(), named_schemas={})
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    header = b"\xc3\x01" + bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schema, turn().model_dump() | {"cost_micros": 5})
    with pytest.raises(UnknownSchema, match="not a kept schema version"):
        Codec().decode(header + body.getvalue(), TurnEvent)


def test_new_enum_symbols_from_a_future_writer_resolve_to_the_enum_default() -> None:
    writer = fastavro.parse_schema(_future_turn_schema(), named_schemas={})
    reader = kept_schemas()["TurnEvent"][-1].parsed
    body = io.BytesIO()
    record = turn(content=None, content_digest=content_digest("x")).model_dump()
    fastavro.schemaless_writer(
        body, writer, record | {"role": "developer", "privacy": "ephemeral", "cost_micros": 1}
    )
    body.seek(0)
    raw = fastavro.schemaless_reader(body, writer, reader)
    event = TurnEvent.model_validate(raw)
    assert event.role is Role.USER
    assert event.privacy is PrivacyMode.NO_RETENTION


RELEASED_FINGERPRINTS = {
    ("AdmissionRequest", 1): "fd58030761eff905",
    ("DeadLetter", 1): "a11728ec7fb8749c",
    ("Decision", 1): "d209be795a224cde",
    ("Decision", 2): "12717a986e75f3a4",
    ("Decision", 3): "645c1d191bc7b45c",
    ("CompressionJob", 1): "ee6e751a7646124a",
    ("Summary", 1): "f350cde840ca9111",
    ("Invalidation", 1): "00fa890b5d152702",
    ("MemoryCandidate", 1): "d64dd9aa42bb2cae",
    ("MemoryRecord", 1): "78067b821ac19e7e",
    ("RunEvent", 1): "3c44f05741855735",
    ("TenantManifest", 1): "dc80fc16598879c1",
    ("TenantManifest", 2): "a60e0c351b5eb6ac",
    ("TenantManifest", 3): "35b433cb56bcaca4",
    ("TurnEvent", 1): "ee0da02a729c845b",
    ("TurnEvent", 2): "98da192b95339b02",
    ("TurnEvent", 3): "42ac9764e639e447",
    ("TurnEvent", 4): "35f3e145305e8448",
    ("TurnEvent", 5): "c341544a76e1a4be",
    ("UsageReport", 1): "f15d43454141ff3d",
    ("RunEnvelope", 1): "8e09de94de12153e",
    ("CostLine", 1): "f5396131740b8645",
    # Memory governance (issue 15).
    ("MemoryCandidate", 2): "94b22b1ad7f6f3c6",
    ("MemoryRecord", 2): "133e623478ecdca9",
    ("MemoryVerdict", 1): "c58e62f4e2c49cfa",
    ("TenantManifest", 4): "db94133f0c7b1341",
    # Memory governance wired (issue 15): embeddings, the long-term store, commands, stale-context notices.
    ("MemoryCandidate", 3): "bc79e6b70dd19f85",
    ("MemoryRecord", 3): "d4f8d94d2d1e064a",
    ("MemoryVerdict", 2): "eadb65d151970e32",
    ("MemoryCommand", 1): "b8d1a1c64a7a4524",
    ("TenantManifest", 5): "a2a45280ba0b0b0b",
    ("Decision", 4): "0affdb3d3ec445e8",
    # A quiet tenant's records expire: the worker's expire command.
    ("MemoryCommand", 2): "e771b962a53b1946",
    # Who may approve a tenant's memory.
    ("TenantManifest", 6): "b215db41a3f36e19",
}


def test_an_older_worker_refuses_a_command_kind_it_does_not_know_and_reads_the_rest() -> None:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    expire = MemoryCommand(command_id="c-1", tenant_id="acme", kind=MemoryCommandKind.EXPIRE, issued_by="w",
                           issued_at=at)
    with pytest.raises(RejectedRecord):
        Codec(reader_versions={"MemoryCommand": 1}).decode(Codec().encode(expire), MemoryCommand)
    pin = expire.model_copy(update={"kind": MemoryCommandKind.PIN, "memory_id": "mem-1"})
    assert Codec(reader_versions={"MemoryCommand": 1}).decode(Codec().encode(pin), MemoryCommand) == pin
    assert Codec().decode(Codec(writer_versions={"MemoryCommand": 1}).encode(pin), MemoryCommand) == pin


def test_released_schema_versions_are_never_edited_in_place() -> None:
    """A released fingerprint is on the wire for good: editing a kept file strands its records.

    Change a schema by adding ``<Name>.v<N+1>.avsc`` and a row here."""
    kept = {(v.name, v.version): v.fingerprint.hex() for vs in kept_schemas().values() for v in vs}
    assert kept == RELEASED_FINGERPRINTS
