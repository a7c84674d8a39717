"""Table values survive their changelog round trip, including values written by earlier versions."""

from __future__ import annotations

from ctxflow.processors.ledger import RunLedger
from ctxflow.processors.types import StaticCount
from ctxflow.streams.runtime.tables import VALUE_CODECS


def test_static_counts_round_trip_with_the_offset_that_counted_them() -> None:
    codec = VALUE_CODECS["counts"]
    assert codec.loads(codec.dumps(StaticCount(145, 7))) == StaticCount(145, 7)


def test_a_bare_count_from_before_offsets_reads_as_counted_at_the_start() -> None:
    # Changelogs written before counts carried their offset hold a bare integer: every turn may use it.
    assert VALUE_CODECS["counts"].loads(b"145") == StaticCount(145, -1)


def test_run_ledgers_round_trip() -> None:
    ledger = RunLedger()
    ledger.tokens[2] += 13
    ledger.applied = 1
    codec = VALUE_CODECS["runs"]
    assert codec.loads(codec.dumps(ledger)).to_list() == ledger.to_list()
