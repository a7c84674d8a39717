"""The fast admission check and the Redis key scheme agents rely on."""

from __future__ import annotations

import pytest

from processors.admission import RunHeadroom, check_admission
from processors.types import InvalidTenantError
from schemas.models import Slot
from sinks.redis import decisions_key, run_key

HEADROOM = RunHeadroom(
    used={"retrieved": 20_000, "history": 10_000, "total": 35_000},
    hard_limits={"retrieved": 32_000, "history": 64_000, "total": 128_000},
    manifest_version=3,
)


def test_a_plan_within_every_limit_is_admitted() -> None:
    answer = check_admission(HEADROOM, {Slot.RETRIEVED: 5_000, Slot.HISTORY: 2_000})
    assert answer.admitted and answer.known_run
    assert "42000" in answer.reason


def test_a_slot_that_would_reach_its_hard_limit_is_refused_with_the_numbers() -> None:
    answer = check_admission(HEADROOM, {"retrieved": 12_000})
    assert not answer.admitted
    assert answer.reason == "not admitted: slot retrieved would reach 32000 tokens, hard limit 32000"


def test_the_total_is_checked_even_when_every_slot_fits() -> None:
    answer = check_admission(HEADROOM, {Slot.HISTORY: 50_000, Slot.SCRATCHPAD: 45_000})
    assert not answer.admitted
    assert "total context would reach 130000" in answer.reason


def test_an_unknown_run_is_admitted_and_says_so() -> None:
    answer = check_admission(None, {Slot.SYSTEM: 1_000})
    assert answer.admitted and not answer.known_run


def test_negative_plans_and_unknown_slots_are_errors() -> None:
    with pytest.raises(ValueError):
        check_admission(HEADROOM, {Slot.SYSTEM: -1})
    with pytest.raises(ValueError):
        check_admission(HEADROOM, {"prompt": 10})


def test_headroom_round_trips_through_its_redis_value() -> None:
    assert RunHeadroom.from_json(HEADROOM.to_json().encode()) == HEADROOM
    assert RunHeadroom.from_json(RunHeadroom({"total": 3}, {}).to_json()) == RunHeadroom({"total": 3}, {})


@pytest.mark.parametrize("tenant", ["", "a:b", "acme:run:x", " acme", "a" * 200])
def test_redis_keys_refuse_tenant_ids_that_could_reach_another_tenant(tenant: str) -> None:
    with pytest.raises(InvalidTenantError):
        run_key(tenant, "r1")
    with pytest.raises(InvalidTenantError):
        decisions_key(tenant, "r1")


def test_redis_keys_are_tenant_prefixed() -> None:
    assert run_key("acme", "r1") == "ctxflow:acme:run:r1"
    assert decisions_key("acme-eu", "r1").startswith("ctxflow:acme-eu:")
