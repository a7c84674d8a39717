"""The worker's token tables as the broker holds them: the last changelog value of every key.

A Faust table is its changelog (the worker restores it from there after any restart), so reading the changelog
to its end observes exactly what a restarted worker would start from, without asking the worker.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TypeVar

from ctxflow.processors.eviction.planner import TABLE as WORKSETS
from ctxflow.processors.ledger import RunLedger
from ctxflow.processors.manifest import SLOTS
from ctxflow.streams.config import Settings

from tests.support_kafka import read_full_topics

T = TypeVar("T")


def _latest(settings: Settings, table: str, load: Callable[[bytes], T]) -> dict[tuple[str, str], T]:
    """``(tenant, run) -> `` the last value of each key on ``table``'s changelog, loaded (a null value deletes)."""
    values: dict[tuple[str, str], T] = {}
    for record in asyncio.run(read_full_topics(settings, [f"{settings.app_id}-budget-{table}-changelog"])):
        tenant_id, run_id = record.key.decode().split(":", 1)
        if record.value is None:
            values.pop((tenant_id, run_id), None)
        else:
            values[(tenant_id, run_id)] = load(record.value)
    return values


def run_ledgers(settings: Settings) -> dict[tuple[str, str], RunLedger]:
    """``(tenant, run) -> RunLedger`` from the end of the run table's changelog."""
    return _latest(settings, "runs", lambda value: RunLedger.from_list(json.loads(value)))


def working_sets(settings: Settings) -> dict[tuple[str, str], bytes]:
    """``(tenant, run) -> `` the eviction planner's working set as its table's changelog last holds it (the bytes a
    restarted worker, or a table snapshot, starts from), as stored:
    :meth:`processors.eviction.workset.WorkingSet.from_bytes` reads one."""
    return _latest(settings, WORKSETS, bytes)


def aggregate_snapshots(settings: Settings, table: str) -> dict[str, dict]:
    """``key -> snapshot`` (the value's JSON, as its ``to_dict`` wrote it) from the end of an aggregate table's
    changelog: ``tenants`` and ``users`` (spend ledgers) or ``workflows``."""
    topic = f"{settings.app_id}-budget-{table}-changelog"
    values: dict[str, dict] = {}
    for record in asyncio.run(read_full_topics(settings, [topic])):
        if record.value is None:
            values.pop(record.key.decode(), None)
        else:
            values[record.key.decode()] = json.loads(record.value)
    return values


def slot_tokens(ledger: RunLedger) -> dict[str, int]:
    """A run ledger's working-set tokens per slot name."""
    return {slot.value: ledger.tokens[i] for i, slot in enumerate(SLOTS)}
