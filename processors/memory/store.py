"""The memory processor's tables over the chain's state protocol, and every key it reads or writes.

Tables (name: key -> value), each key starting with a validated tenant id and ``:``:

* ``memory_records``: ``tenant:memory_id`` -> :class:`MemoryRecord` (the canonical record, also on the topic);
* ``memory_buckets``: ``tenant:scope:owner`` -> the live memory ids compared for duplicates and conflicts;
* ``memory_revoked``: ``tenant:identity digest`` -> the tombstone's memory id (blocks the same content);
* ``memory_verdicts``: ``tenant:candidate_id`` -> :class:`MemoryVerdict` (replayed for a redelivered candidate);
* ``memory_reviews``: ``tenant:review_id`` -> :class:`ReviewItem` (open questions for a reviewer);
* ``memory_runs``: ``tenant:run_id`` -> :class:`RunFacts` of a run that handled no-retention content or has a
  parent (only those: a run without either is what the gate assumes), forgotten when the run retires.

A bucket's records are read under the bucket's own tenant, so no lookup can reach another tenant's records.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime

from ctxflow.processors.chain import TableSpec
from ctxflow.processors.memory.lifecycle import ReviewItem
from ctxflow.processors.memory.policy import RunFacts
from ctxflow.processors.types import BudgetStore
from ctxflow.schemas.models import MemoryRecord, MemoryVerdict, PrivacyMode
from pydantic import BaseModel

RECORDS, BUCKETS, REVOKED, VERDICTS, REVIEWS, RUNS = (
    "memory_records",
    "memory_buckets",
    "memory_revoked",
    "memory_verdicts",
    "memory_reviews",
    "memory_runs",
)


def _model_table(name: str, model: type[BaseModel]) -> TableSpec:
    return TableSpec(name, lambda v: v.model_dump_json().encode(), lambda b: model.model_validate_json(b))


def _dump_review(item: ReviewItem) -> bytes:
    raw = asdict(item)
    raw["opened_at"] = item.opened_at.isoformat()
    return json.dumps(raw).encode()


def _load_review(data: bytes) -> ReviewItem:
    raw = json.loads(data)
    raw["opened_at"] = datetime.fromisoformat(raw["opened_at"])
    raw["conflicting_ids"] = tuple(raw["conflicting_ids"])
    return ReviewItem(**raw)


def _dump_run(facts: RunFacts) -> bytes:
    return json.dumps([facts.privacy.value, facts.parent_run_id]).encode()


def _load_run(data: bytes) -> RunFacts:
    privacy, parent = json.loads(data)
    return RunFacts(PrivacyMode(privacy), parent)


TABLES: tuple[TableSpec, ...] = (
    _model_table(VERDICTS, MemoryVerdict),
    _model_table(RECORDS, MemoryRecord),
    TableSpec(BUCKETS, lambda v: json.dumps(list(v)).encode(), lambda b: tuple(json.loads(b))),
    TableSpec(REVOKED, lambda v: v.encode(), lambda b: b.decode()),
    TableSpec(REVIEWS, _dump_review, _load_review),
    TableSpec(RUNS, _dump_run, _load_run),
)
"""The changelog forms of the memory tables, for the worker (see :class:`processors.chain.TableSpec`).

The worker persists a processor's tables one at a time, the last listed first, so ``memory_verdicts`` is durable
last: a stored verdict is what makes a redelivered candidate change nothing, so every record, bucket and block
its judgement wrote must be durable before it (a crash in between replays the candidate, which writes the same
values again)."""


class MemoryTables:
    """Typed access to the memory tables of one state store."""

    def __init__(self, state: BudgetStore) -> None:
        self.state = state

    def record(self, tenant_id: str, memory_id: str) -> MemoryRecord | None:
        """The tenant's record ``memory_id``, or None."""
        return self.state.get_state(RECORDS, f"{tenant_id}:{memory_id}")

    def put_record(self, record: MemoryRecord) -> None:
        """Store ``record`` under its own tenant."""
        self.state.put_state(RECORDS, f"{record.tenant_id}:{record.memory_id}", record)

    def bucket(self, bucket: str) -> list[MemoryRecord]:
        """The live records of a bucket (key from :func:`~processors.memory.identity.bucket_key`)."""
        tenant = bucket.split(":", 1)[0]
        ids = self.state.get_state(BUCKETS, bucket) or ()
        found = (self.record(tenant, mid) for mid in ids)
        return [r for r in found if r is not None]

    def add_to_bucket(self, bucket: str, memory_id: str) -> None:
        """Make ``memory_id`` one of the bucket's live records."""
        ids = tuple(self.state.get_state(BUCKETS, bucket) or ())
        if memory_id not in ids:
            self.state.put_state(BUCKETS, bucket, (*ids, memory_id))

    def drop_from_bucket(self, bucket: str, memory_id: str) -> None:
        """``memory_id`` is no longer live (superseded or revoked)."""
        ids = tuple(self.state.get_state(BUCKETS, bucket) or ())
        if memory_id in ids:
            self.state.put_state(BUCKETS, bucket, tuple(i for i in ids if i != memory_id))

    def is_revoked(self, tenant_id: str, digest: str) -> bool:
        """Whether content with this identity digest was revoked in the tenant."""
        return self.state.get_state(REVOKED, f"{tenant_id}:{digest}") is not None

    def block(self, tenant_id: str, digest: str, memory_id: str) -> None:
        """Refuse this identity digest from now on (a tombstone was written)."""
        self.state.put_state(REVOKED, f"{tenant_id}:{digest}", memory_id)

    def unblock(self, tenant_id: str, digest: str) -> None:
        """Accept the digest again (a human approved the content after review)."""
        self.state.delete_state(REVOKED, f"{tenant_id}:{digest}")

    def verdict(self, tenant_id: str, candidate_id: str) -> MemoryVerdict | None:
        """The verdict already given on a candidate, or None."""
        return self.state.get_state(VERDICTS, f"{tenant_id}:{candidate_id}")

    def put_verdict(self, verdict: MemoryVerdict) -> None:
        """Remember a verdict, so a redelivered candidate gets it again."""
        self.state.put_state(VERDICTS, f"{verdict.tenant_id}:{verdict.candidate_id}", verdict)

    def put_review(self, item: ReviewItem) -> None:
        """Open a review item."""
        self.state.put_state(REVIEWS, f"{item.tenant_id}:{item.review_id}", item)

    def run(self, key: str) -> RunFacts | None:
        """What is known of run ``key`` (``tenant:run_id``), or None (nothing beyond the defaults)."""
        return self.state.get_state(RUNS, key)

    def put_run(self, key: str, facts: RunFacts) -> None:
        """Remember what was learnt of a run."""
        self.state.put_state(RUNS, key, facts)

    def forget_run(self, key: str) -> None:
        """The run retired (a tombstone on the changelog when something was known of it)."""
        if self.state.get_state(RUNS, key) is not None:
            self.state.delete_state(RUNS, key)
