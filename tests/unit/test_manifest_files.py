"""Manifest files: formats, complete validation messages, and the version rules of ``ctxflow tenants set``."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from ctxflow.schemas.models import TenantManifest
from ctxflow.streams.sdk.manifest_files import (
    ManifestFileError,
    StaleVersion,
    assign_version,
    field_path,
    first_with_version,
    latest_per_tenant,
    latest_version,
    load_manifest,
    stamp,
    validate_document,
)

EXAMPLES = Path(__file__).parents[2] / "examples" / "manifests"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
BASE: dict[str, Any] = {
    "tenant_id": "acme", "tier": "standard", "slot_caps": {"history": 4000}, "total_cap": 8000,
    "spend_windows": [{"window": "day", "max_tokens": 100_000}],
    "user_overrides": {"bob": {"total_cap": 2000}},
}


def problems_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestFileError) as caught:
        validate_document(document, "test.json", NOW)
    return caught.value.problems


def manifest(version: int, tenant: str = "acme", by: str = "ops") -> TenantManifest:
    return stamp(validate_document({**BASE, "tenant_id": tenant}, "t", NOW).manifest, version, NOW, by)


def test_the_shipped_examples_are_valid_and_cover_every_tier() -> None:
    loaded = {p.stem: load_manifest(p).manifest for p in sorted(EXAMPLES.glob("*.json"))}
    assert {m.tier for m in loaded.values()} == {"free", "standard", "enterprise"}
    enterprise = loaded["enterprise"]
    assert enterprise.user_overrides and enterprise.spend_windows
    assert any(o.spend_windows for o in enterprise.user_overrides.values())


def test_json_toml_and_yaml_files_give_the_same_manifest(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(json.dumps(BASE))
    (tmp_path / "m.toml").write_text(
        'tenant_id = "acme"\ntier = "standard"\ntotal_cap = 8000\n[slot_caps]\nhistory = 4000\n'
        '[[spend_windows]]\nwindow = "day"\nmax_tokens = 100000\n[user_overrides.bob]\ntotal_cap = 2000\n'
    )
    (tmp_path / "m.yaml").write_text(
        "tenant_id: acme\ntier: standard\ntotal_cap: 8000\nslot_caps: {history: 4000}\n"
        "spend_windows: [{window: day, max_tokens: 100000}]\nuser_overrides: {bob: {total_cap: 2000}}\n"
    )
    drafts = [load_manifest(tmp_path / name, NOW) for name in ("m.json", "m.toml", "m.yaml")]
    assert drafts[0] == drafts[1] == drafts[2]
    assert drafts[0].manifest.user_overrides["bob"].total_cap == 2000


def test_yaml_without_pyyaml_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # what a production install without PyYAML looks like
    (tmp_path / "m.yml").write_text("tenant_id: acme\n")
    with pytest.raises(ManifestFileError, match=r"PyYAML.*JSON and TOML work without it"):
        load_manifest(tmp_path / "m.yml")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("m.json", '{"tenant_id": "acme",', "not valid JSON: .*line 1"),
        ("m.toml", "tenant_id = ", "not valid TOML"),
        ("m.json", "[1, 2]", "top level must be a mapping"),
        ("m.ini", "", "unknown file type '.ini'"),
    ],
)
def test_unreadable_files_say_why(tmp_path: Path, name: str, text: str, expected: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ManifestFileError, match=expected):
        load_manifest(tmp_path / name)


def test_a_missing_file_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestFileError, match="cannot read the file"):
        load_manifest(tmp_path / "absent.json")


def test_every_schema_problem_is_listed_with_its_field_path_and_what_is_allowed() -> None:
    problems = problems_of({
        **BASE, "overflow": "drop", "total_cap": -1, "slot_caps": {"histroy": 10},
        "spend_windows": [{"window": "week", "max_tokens": 5}],
        "user_overrides": {"bob": {"total_cap": 2000, "colour": "red"}}, "tenant_id": "a:b",
    })
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "overflow: Input should be 'evict_and_compress' or 'reject' (got 'drop')" in problems
    assert "total_cap: Input should be greater than or equal to 0 (got -1)" in problems
    assert "slot_caps.histroy: unknown field (allowed: history, output, retrieved, scratchpad, system, tools)" in text
    assert "spend_windows[0].window: Input should be 'hour', 'day' or 'month' (got 'week')" in problems
    assert "user_overrides['bob'].colour: unknown field (allowed: run_cap_tokens, soft_watermark" in text
    assert "tenant_id: String should match pattern" in text


def test_missing_required_fields_are_named() -> None:
    assert problems_of({"tier": "free"}) == [
        "tenant_id: required field is missing", "slot_caps: required field is missing",
        "total_cap: required field is missing",
    ]


def test_consistency_problems_name_the_fields_once_the_schema_passes() -> None:
    problems = problems_of({
        **BASE, "slot_caps": {"history": 9000}, "subagent_share": 0.5,
        "spend_windows": [{"window": "day", "max_tokens": 1}, {"window": "day"}],
    })
    assert "slot_caps.history (9000) exceeds total_cap (8000)" in problems
    assert "subagent_share needs workflow_cap_tokens (it is a fraction of the workflow cap)" in problems
    assert "spend_windows: more than one day window: keep one per window kind" in problems
    assert "spend_windows: the day window sets neither max_tokens nor max_cost_micros" in problems


def test_version_is_optional_and_the_update_stamp_is_always_replaced() -> None:
    draft = validate_document({**BASE, "updated_at": "1999-01-01T00:00:00Z", "updated_by": "forged"}, "f", NOW)
    assert draft.requested_version is None
    assert (draft.manifest.updated_at, draft.manifest.updated_by) == (NOW, None)
    assert validate_document({**BASE, "version": 7}, "f", NOW).requested_version == 7
    assert validate_document({**BASE, "version": None}, "f", NOW).requested_version is None
    assert problems_of({**BASE, "version": 0}) == ["version: Input should be greater than or equal to 1 (got 0)"]


def test_assign_version_is_latest_plus_one_unless_a_greater_one_is_requested() -> None:
    assert assign_version("acme", None, None) == 1
    assert assign_version("acme", None, 3) == 4
    assert assign_version("acme", 9, 3) == 9
    assert assign_version("acme", 2, None) == 2


@pytest.mark.parametrize("requested", [1, 3])
def test_a_version_not_above_the_latest_is_refused_with_the_next_one_named(requested: int) -> None:
    with pytest.raises(StaleVersion, match=f"at version 3: version {requested} would be ignored.*publish 4"):
        assign_version("acme", requested, 3)


def test_stamp_sets_version_and_update_stamp_at_wire_precision() -> None:
    at = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    stamped = stamp(manifest(1), 5, at, "alice")
    assert (stamped.version, stamped.updated_by) == (5, "alice")
    assert stamped.updated_at == at.replace(microsecond=123000)


def test_history_helpers_follow_the_worker_and_compaction_rules() -> None:
    v1, v2, v2_late = manifest(1), manifest(2, by="first"), manifest(2, by="second")
    assert latest_version([v1, v2, v2_late]) == 2
    assert latest_version([]) is None
    # The worker applies a version only if above the one it holds: the first v2 wins a race.
    assert first_with_version([v1, v2, v2_late], 2) is v2
    assert first_with_version([v1], 2) is None
    other, kept = manifest(4, tenant="globex"), manifest(1, "kept")
    # What the worker enforces: the first highest version; a stale version or a null value published later
    # changes nothing (the worker ignores the one and dead-letters the other).
    log = [("acme", v1), ("globex", other), ("acme", v2), ("acme", v2_late), ("acme", v1), ("kept", kept),
           ("kept", None)]
    assert latest_per_tenant(log) == {"acme": v2, "globex": other, "kept": kept}


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("slot_caps", "history"), "slot_caps.history"),
        (("spend_windows", 2, "window"), "spend_windows[2].window"),
        (("user_overrides", "bob", "spend_windows", 0, "max_tokens"),
         "user_overrides['bob'].spend_windows[0].max_tokens"),
        (("tokenizers", "gpt-4"), "tokenizers['gpt-4']"),
        (("tokenizers", "", "[key]"), "tokenizers['']"),
    ],
)
def test_field_paths_read_like_the_file(loc: tuple[Any, ...], path: str) -> None:
    assert field_path(loc) == path
