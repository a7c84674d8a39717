"""The contract the models enforce beyond Avro, and that the models mirror the newest schemas exactly."""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import ctxflow.schemas
import pytest
from ctxflow.schemas import MODEL_SCHEMAS, ContractViolation, content_digest, kept_schemas
from ctxflow.schemas import models as m
from ctxflow.schemas.contract import ContractLimits, check_limits, explain
from ctxflow.streams.topics import ALL_TOPICS
from pydantic import BaseModel, ValidationError

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def turn(**overrides: Any) -> m.TurnEvent:
    fields: dict[str, Any] = {
        "event_id": "e-1",
        "tenant_id": "acme",
        "user_id": "u",
        "session_id": "s",
        "run_id": "r",
        "agent_id": "a",
        "seq": 0,
        "role": "user",
        "kind": "message",
        "slot": "history",
        "item_id": "i",
        "content": "hello",
        "model": "gpt-4o",
        "occurred_at": NOW,
    }
    fields.update(overrides)
    return m.TurnEvent(**fields)


@pytest.mark.parametrize("tenant", ["acme", "A", "t_1.eu-west", "9" * 128])
def test_valid_tenant_ids_are_accepted(tenant: str) -> None:
    assert turn(tenant_id=tenant).tenant_id == tenant


@pytest.mark.parametrize("tenant", ["", "acme:eu", "-acme", ".acme", "a b", "9" * 129, "ténant"])
def test_invalid_tenant_ids_are_rejected(tenant: str) -> None:
    with pytest.raises(ValidationError, match="tenant_id"):
        turn(tenant_id=tenant)


def test_content_digest_is_sha256_hex_of_utf8() -> None:
    assert content_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_digest_is_required_without_content_and_must_match_content() -> None:
    with pytest.raises(ValidationError, match="content_digest is required when content is null"):
        turn(content=None)
    assert turn(content=None, content_digest=content_digest("x")).content is None
    with pytest.raises(ValidationError, match="not the sha256 of content"):
        turn(content="hello", content_digest=content_digest("bye"))
    with pytest.raises(ValidationError, match="content_digest"):
        turn(content=None, content_digest="NOT-HEX")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq", -1),
        ("token_count", -1),
        ("token_count", 2**31),
        ("importance", 1.5),
        ("importance", -0.1),
        ("relevance", float("nan")),
        ("tier_hint", 4),
        ("embedding", [float("inf")]),
        ("embedding", [1e39]),
    ],
)
def test_out_of_range_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        turn(**{field: value})


def test_floats_and_timestamps_take_their_wire_precision() -> None:
    event = turn(
        importance=0.1, occurred_at=datetime(2026, 1, 1, 2, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    )
    assert event.importance == 0.10000000149011612
    assert event.occurred_at == datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert event.occurred_at.tzinfo is UTC


def test_naive_timestamps_are_rejected() -> None:
    with pytest.raises(ValidationError, match="occurred_at"):
        turn(occurred_at=datetime(2026, 1, 1))


def test_models_are_frozen_and_reject_unknown_fields() -> None:
    event = turn()
    with pytest.raises(ValidationError):
        event.seq = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        turn(colour="blue")


def run_event(**overrides: Any) -> m.RunEvent:
    fields: dict[str, Any] = {
        "event_id": "e",
        "tenant_id": "acme",
        "user_id": "u",
        "session_id": "s",
        "run_id": "r",
        "workflow_id": "r",
        "agent_id": "a",
        "phase": "started",
        "occurred_at": NOW,
    }
    fields.update(overrides)
    return m.RunEvent(**fields)


def test_run_status_is_set_exactly_on_finalized_runs() -> None:
    assert run_event(phase="finalized", status="succeeded").status is m.RunStatus.SUCCEEDED
    with pytest.raises(ValidationError, match="status is required on a finalized run"):
        run_event(phase="finalized")
    with pytest.raises(ValidationError, match="status is required"):
        run_event(status="failed")


def test_root_run_is_its_own_workflow() -> None:
    assert run_event(parent_run_id="p", workflow_id="root").workflow_id == "root"
    with pytest.raises(ValidationError, match="workflow_id equal to run_id"):
        run_event(workflow_id="other")


@pytest.mark.parametrize(
    ("field", "value"), [("soft_watermark", 0.0), ("soft_watermark", 1.01), ("version", 0)]
)
def test_manifest_ranges(field: str, value: object) -> None:
    fields: dict[str, Any] = {
        "tenant_id": "acme",
        "version": 1,
        "tier": "free",
        "slot_caps": {},
        "total_cap": 1000,
        "updated_at": NOW,
        field: value,
    }
    with pytest.raises(ValidationError, match=field):
        m.TenantManifest(**fields)


def test_reasons_name_the_field_but_never_echo_payload() -> None:
    with pytest.raises(ValidationError) as err:
        m.TurnEvent.model_validate(turn().model_dump() | {"seq": -4, "embedding": [float("nan")]})
    reason = explain(err.value, "TurnEvent")
    assert "TurnEvent.seq: Input should be greater than or equal to 0 (got -4)" in reason
    assert "TurnEvent.embedding" in reason and "nan" not in reason


def test_content_limit_counts_utf8_bytes_not_characters() -> None:
    check_limits({"content": "€" * 333}, "TurnEvent", ContractLimits(max_content_bytes=999))
    with pytest.raises(
        ContractViolation, match=r"TurnEvent\.content is 1002 UTF-8 bytes, over the limit of 999"
    ):
        check_limits(
            {"content": "€" * 334, "tenant_id": "acme"}, "TurnEvent", ContractLimits(max_content_bytes=999)
        )


def _newest(name: str) -> dict[str, Any]:
    return json.loads(kept_schemas()[name][-1].text)


def _named_types(schema: Any, found: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if isinstance(schema, list):
        for branch in schema:
            _named_types(branch, found)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum"):
            found[schema["name"]] = schema
        for key in ("fields", "items", "values"):
            if key in schema:
                _named_types(schema[key], found)
        if "name" in schema and "type" in schema and schema.get("type") not in ("record", "enum"):
            _named_types(schema["type"], found)
        for field in schema.get("fields", []):
            _named_types(field["type"], found)
    return found


def _all_named_types() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for name in MODEL_SCHEMAS.values():
        _named_types(_newest(name), found)
    return found


def test_models_mirror_the_newest_schemas_field_for_field() -> None:
    for schema in _all_named_types().values():
        if schema["type"] != "record":
            continue
        model: type[BaseModel] = getattr(m, schema["name"])
        assert list(model.model_fields) == [f["name"] for f in schema["fields"]], schema["name"]
        for field in schema["fields"]:
            info = model.model_fields[field["name"]]
            if "default" in field:
                default = info.get_default(call_default_factory=True)
                assert default == field["default"], f"{schema['name']}.{field['name']}"
            else:
                assert info.is_required(), f"{schema['name']}.{field['name']} has no Avro default"


def test_python_enums_match_avro_symbols() -> None:
    enums = {n: s for n, s in _all_named_types().items() if s["type"] == "enum"}
    # 17, and issue 15's Verification, Sensitivity, ReviewState, VerdictOutcome, MemoryCommandKind, ReviewAction
    assert len(enums) == 23
    for name, schema in enums.items():
        python_enum: type[enum.StrEnum] = getattr(m, name)
        assert [member.value for member in python_enum] == schema["symbols"], name


def test_readme_documents_every_topic_with_its_schema_versions() -> None:
    readme = (Path(ctxflow.schemas.__file__).parent / "README.md").read_text(encoding="utf-8")
    for topic in ALL_TOPICS:
        section = readme.split(f"### `{topic.name}`\n", 1)[1].split("###", 1)[0]
        assert f"cleanup `{topic.cleanup}`" in section, topic.name
        for v in kept_schemas()[topic.schema]:
            assert f"v{v.version} `{v.fingerprint.hex()}`" in section, (topic.name, v.version)
