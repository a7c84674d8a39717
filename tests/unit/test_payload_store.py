"""The local content-addressed payload store: idempotent, verified, and unable to escape its directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from ctxflow.processors.memory.processor import payload_ref
from ctxflow.schemas import content_digest
from ctxflow.sinks.payloads import CorruptPayload, LocalPayloadStore

TEXT = "Working style: small pull requests, tests first. " * 300


def test_a_payload_round_trips_under_the_key_the_processor_names(tmp_path: Path) -> None:
    store = LocalPayloadStore(tmp_path)
    ref = payload_ref("acme", content_digest(TEXT))
    store.put(ref, TEXT.encode())
    store.put(ref, TEXT.encode())  # a replayed write is a no-op
    assert store.get(ref).decode() == TEXT
    assert [p.name for p in (tmp_path / "acme").rglob("*") if p.is_file()] == [content_digest(TEXT)]


def test_content_that_does_not_match_its_key_is_refused_and_damage_is_detected(tmp_path: Path) -> None:
    store = LocalPayloadStore(tmp_path)
    ref = payload_ref("acme", content_digest(TEXT))
    with pytest.raises(CorruptPayload):
        store.put(ref, b"something else")
    store.put(ref, TEXT.encode())
    (tmp_path / ref).write_bytes(b"tampered")
    with pytest.raises(CorruptPayload):
        store.get(ref)


def test_tenants_are_separate_and_delete_is_idempotent(tmp_path: Path) -> None:
    store = LocalPayloadStore(tmp_path)
    mine, theirs = payload_ref("acme", content_digest(TEXT)), payload_ref("ACME", content_digest(TEXT))
    store.put(mine, TEXT.encode())
    with pytest.raises(KeyError):
        store.get(theirs)
    store.delete(mine)
    store.delete(mine)
    with pytest.raises(KeyError):
        store.get(mine)


@pytest.mark.parametrize(
    "ref",
    ["../etc/passwd", "acme/sha256/ab/" + "0" * 64, "acme/../../x/sha256/00/" + "0" * 64, "/abs/sha256/00/" + "0" * 64],
)
def test_keys_that_are_not_content_addresses_are_refused(tmp_path: Path, ref: str) -> None:
    with pytest.raises(ValueError, match="not a payload key"):
        LocalPayloadStore(tmp_path).get(ref)
