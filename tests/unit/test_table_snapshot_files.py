"""Table snapshot files (:mod:`streams.runtime.snapshots`): what is saved loads back byte for byte; a missing,
truncated or too-new file, or one of another deployment, loads as nothing (the partition is read from offset 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ctxflow.streams.runtime import snapshots
from ctxflow.streams.runtime.snapshots import Deployment, SnapshotFiles
from hypothesis import given
from hypothesis import strategies as st

DEPLOYMENT = Deployment("app", "prefix", 4)
TOPIC = "app-budget-runs-changelog"


@given(st.dictionaries(st.binary(max_size=40), st.binary(max_size=300), max_size=50),
       st.integers(min_value=0, max_value=2**62))
def test_a_saved_snapshot_loads_back_exactly(tmp_path_factory: pytest.TempPathFactory, values: dict[bytes, bytes],
                                             offset: int) -> None:
    files = SnapshotFiles(tmp_path_factory.mktemp("state"), DEPLOYMENT)
    files.save(TOPIC, 3, offset, values.items())
    loaded = files.load(TOPIC, 3)
    assert loaded is not None and loaded.offset == offset and loaded.values == values


def test_unusable_files_load_as_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = SnapshotFiles(tmp_path, DEPLOYMENT)
    assert files.load(TOPIC, 0) is None  # missing

    files.save(TOPIC, 0, 10, [(b"k", b"v")])
    raw = files.path(TOPIC, 0).read_bytes()
    files.path(TOPIC, 0).write_bytes(raw[:-5])
    assert files.load(TOPIC, 0) is None  # truncated

    assert SnapshotFiles(tmp_path, Deployment("app", "prefix", 8)).load(TOPIC, 0) is None  # another partition count
    files.save(TOPIC, 1, 10, [(b"k", b"v")])
    files.path(TOPIC, 1).rename(files.path(TOPIC, 2))
    assert files.load(TOPIC, 2) is None  # another partition's file

    monkeypatch.setattr(snapshots, "FORMAT_VERSION", snapshots.FORMAT_VERSION + 1)
    newer = SnapshotFiles(tmp_path / "newer", DEPLOYMENT)
    newer.save(TOPIC, 0, 10, [(b"k", b"v")])
    monkeypatch.setattr(snapshots, "FORMAT_VERSION", snapshots.FORMAT_VERSION - 1)
    assert newer.load(TOPIC, 0) is None  # written by a newer ctxflow


def test_an_older_snapshot_never_replaces_a_newer_one(tmp_path: Path) -> None:
    files = SnapshotFiles(tmp_path, DEPLOYMENT)
    files.save(TOPIC, 0, 20, [(b"k", b"new")])
    files.save(TOPIC, 0, 10, [(b"k", b"old")])
    loaded = files.load(TOPIC, 0)
    assert loaded is not None and loaded.offset == 20 and loaded.values == {b"k": b"new"}
