"""Precise contradictions and near-duplicates over the near-miss set (tests/unit/data/memory_near_misses.json).

The set's promise: zero collateral supersessions (a record about another subject or attribute, or the same value
in another unit or format, is never retired) and every true contradiction supersedes exactly its one record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ctxflow.processors.memory.conflict import contradictions, near_duplicate
from ctxflow.processors.memory.policy import MemoryPolicy
from ctxflow.processors.memory.processor import RECORDS, MemoryGateProcessor
from ctxflow.processors.memory.values import normalise_value
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas import content_digest
from ctxflow.schemas.models import MemoryRecord, MemoryScope, MemoryStatus, MemoryType, Verification
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support_memory import NOW, candidate, shared_gate

DATA = json.loads((Path(__file__).parent / "data" / "memory_near_misses.json").read_text(encoding="utf-8"))
PROBES = DATA["probes"]


def record(item: dict[str, Any], type_: MemoryType = MemoryType.FACT) -> MemoryRecord:
    return MemoryRecord(
        memory_id=item.get("id", item.get("name", "probe")),
        tenant_id="acme",
        scope=MemoryScope.TENANT,
        type=type_,
        status=MemoryStatus.ACTIVE,
        version=1,
        content=item["content"],
        content_digest=content_digest(item["content"]),
        created_at=NOW,
        updated_at=NOW,
        subject=item.get("subject"),
        attribute=item.get("attribute"),
        value=item.get("value"),
    )


EXISTING = [record(item) for item in DATA["existing"]]


@pytest.mark.parametrize("probe", PROBES, ids=[p["name"] for p in PROBES])
def test_each_probe_supersedes_exactly_what_the_set_says(probe: dict[str, Any]) -> None:
    found = [r.memory_id for r in contradictions(record(probe), EXISTING)]
    assert found == ([probe["supersedes"]] if probe["supersedes"] else [])


def test_the_near_miss_set_has_zero_collateral_supersessions() -> None:
    collateral = []
    true_hits = 0
    for probe in PROBES:
        for hit in contradictions(record(probe), EXISTING):
            if hit.memory_id == probe["supersedes"]:
                true_hits += 1
            else:
                collateral.append((probe["name"], hit.memory_id))
    assert collateral == []
    assert true_hits == sum(1 for p in PROBES if p["supersedes"])


def _fact(item: dict[str, Any], n: int) -> Any:
    return candidate(
        item["content"],
        candidate_id=f"c-{n}",
        scope=MemoryScope.TENANT,
        type=MemoryType.FACT,
        subject=item["subject"],
        attribute=item["attribute"],
        value=item["value"],
        verification=Verification.HUMAN_APPROVED,
        verified_by="ops",
    )


@pytest.mark.parametrize("probe", PROBES, ids=[p["name"] for p in PROBES])
def test_through_the_processor_a_probe_retires_only_its_own_record(probe: dict[str, Any]) -> None:
    processor = MemoryGateProcessor(shared_gate(), lambda _t: MemoryPolicy())
    state = DictBudgetState()
    ids: dict[str, str] = {}
    for n, item in enumerate(DATA["existing"]):
        out = processor.process(_fact(item, n), Position("memory.candidates", 0, n), state, NOW)
        ids[item["id"]] = out[-1].memory_id
    out = processor.process(_fact(probe, 99), Position("memory.candidates", 0, 99), state, NOW)
    verdict = out[-1]
    superseded = [
        name for name, mid in ids.items() if state.get_state(RECORDS, f"acme:{mid}").status is MemoryStatus.SUPERSEDED
    ]
    assert superseded == ([probe["supersedes"]] if probe["supersedes"] else [])
    if probe["supersedes"]:
        new = state.get_state(RECORDS, f"acme:{verdict.memory_id}")
        old = state.get_state(RECORDS, f"acme:{ids[probe['supersedes']]}")
        assert (new.status, new.supersedes, old.superseded_by) == (
            MemoryStatus.ACTIVE, old.memory_id, new.memory_id)


@pytest.mark.parametrize("pair", DATA["near_duplicates"], ids=lambda p: f"{p['a']} ~ {p['b']}")
def test_near_duplicates_merge_and_near_misses_do_not(pair: dict[str, Any]) -> None:
    a = record({"id": "a", "content": pair["a"]}, MemoryType.PREFERENCE)
    b = record({"id": "b", "content": pair["b"]}, MemoryType.PREFERENCE)
    assert (near_duplicate(b, [a]) is not None) is pair["merge"]


def test_text_alike_facts_about_other_subjects_are_not_duplicates() -> None:
    carol = record({"id": "c", "content": "Carol works in the PST timezone"})
    bob = record({"id": "b", "content": "Bob works in the PST timezone"})
    assert near_duplicate(carol, [bob]) is None
    keyed = record({"id": "k", "content": "Carol works in the PST timezone", "subject": "carol",
                    "attribute": "timezone", "value": "PST"})
    assert near_duplicate(keyed, [record(DATA["existing"][2])]) is None


@pytest.mark.parametrize(
    "same",
    [
        ("5 km", "5000 m", "5 kilometers"),
        ("10 min", "600 s"),
        ("2026-01-05", "Jan 5, 2026", "5 January 2026", "January 5th, 2026"),
        ("$1,200", "1200 USD", "USD 1,200.00"),
        ("1,200", "1200.0"),
        ("CET", "cet.", " CET "),
    ],
)
def test_values_differing_only_in_unit_or_format_are_the_same(same: tuple[str, ...]) -> None:
    assert len({normalise_value(v) for v in same}) == 1, [normalise_value(v) for v in same]


@pytest.mark.parametrize(
    ("a", "b"),
    [("5 km", "6 km"), ("5 km", "5 kg"), ("2026-01-05", "2026-05-01"), ("$1,200", "€1,200"), ("CET", "PST")],
)
def test_different_values_stay_different(a: str, b: str) -> None:
    assert normalise_value(a) != normalise_value(b)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10**6))
def test_metres_and_kilometres_agree_for_any_distance(metres: int) -> None:
    assert normalise_value(f"{metres} m") == normalise_value(f"{metres / 1000} km")
