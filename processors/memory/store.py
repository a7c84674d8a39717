"""The memory processor's tables over the chain's state protocol, and every key it reads or writes.

Tables (name: key -> value), each key starting with a validated tenant id and ``:``:

* ``memory_records``: ``tenant:memory_id`` -> :class:`MemoryRecord` (the canonical record, also on the topic);
* ``memory_buckets``: ``tenant:scope:owner`` -> the live memory ids compared for duplicates and conflicts;
* ``memory_revoked``: ``tenant:identity digest`` -> the tombstone's memory id (blocks the same content);
* ``memory_verdicts``: ``tenant:candidate_id`` -> :class:`MemoryVerdict` (replayed for a redelivered candidate);
* ``memory_reviews``: ``tenant:review_id`` -> :class:`ReviewItem` (open questions for a reviewer);
* ``memory_runs``: ``tenant:run_id`` -> :class:`RunFacts` of a run that handled no-retention content or has a
  parent (only those: a run without either is what the gate assumes), forgotten when the run retires;
* ``memory_run_records``: ``tenant:run_id`` -> the memory ids the run's candidates created (revoked if the run
  turns out to be no-retention after they were accepted), forgotten when the run retires;
* ``memory_live_pages``: ``tenant:pNN`` -> the tenant's active memory ids hashed to page NN (:data:`PAGES` pages):
  what the long-term store's eviction ranks, read only when it evicts;
* ``memory_live_counts``: ``tenant:`` -> how many active records the tenant holds: the O(1) quota check.

The live pages and counts follow every record written through :meth:`MemoryTables.put_record` (a status change
into or out of ``active``), so no transition elsewhere can forget them. A count moves only when its page did,
so a replayed write counts once; a crash between the two tables can leave the count one off, which the next
eviction round, recounting its pages, corrects (:mod:`processors.memory.quota`).

A bucket's records are read under the bucket's own tenant, so no lookup can reach another tenant's records.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from hashlib import blake2b

from ctxflow.processors.chain import TableSpec
from ctxflow.processors.memory.lifecycle import ReviewItem
from ctxflow.processors.memory.policy import RunFacts
from ctxflow.processors.types import BudgetStore
from ctxflow.schemas.models import MemoryRecord, MemoryStatus, MemoryVerdict, PrivacyMode
from pydantic import BaseModel

RECORDS, BUCKETS, REVOKED, VERDICTS, REVIEWS, RUNS = (
    "memory_records",
    "memory_buckets",
    "memory_revoked",
    "memory_verdicts",
    "memory_reviews",
    "memory_runs",
)
RUN_RECORDS, LIVE_PAGES, LIVE_COUNTS = "memory_run_records", "memory_live_pages", "memory_live_counts"
PAGES = 64
"""Pages of a tenant's live ids: a write rewrites one page (a 64th of the tenant's live ids), eviction reads all."""


def _ids_table(name: str) -> TableSpec:
    return TableSpec(name, lambda v: json.dumps(list(v)).encode(), lambda b: tuple(json.loads(b)))


def page_key(tenant_id: str, memory_id: str) -> str:
    """The live page holding ``memory_id`` (a stable hash: the same page in every process and replay)."""
    page = int.from_bytes(blake2b(memory_id.encode(), digest_size=2).digest(), "big") % PAGES
    return f"{tenant_id}:p{page:02d}"


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
    _ids_table(BUCKETS),
    TableSpec(REVOKED, lambda v: v.encode(), lambda b: b.decode()),
    TableSpec(REVIEWS, _dump_review, _load_review),
    TableSpec(RUNS, _dump_run, _load_run),
    _ids_table(LIVE_PAGES),
    TableSpec(LIVE_COUNTS, lambda v: str(v).encode(), lambda b: int(b)),
    _ids_table(RUN_RECORDS),
)
"""The changelog forms of the memory tables, for the worker (see :class:`processors.chain.TableSpec`).

The worker persists a processor's tables one at a time, the last listed first, so ``memory_verdicts`` is durable
last: a stored verdict is what makes a redelivered candidate change nothing, so every record, bucket and block
its judgement wrote must be durable before it (a crash in between replays the candidate, which writes the same
values again). The live pages are durable before the records: a replayed write then finds its id already paged
and counts nothing twice; the counts before the pages, so a crash between them leaves a count one too high
(an early recount), never too low (a late eviction)."""


class MemoryTables:
    """Typed access to the memory tables of one state store."""

    def __init__(self, state: BudgetStore) -> None:
        self.state = state

    def record(self, tenant_id: str, memory_id: str) -> MemoryRecord | None:
        """The tenant's record ``memory_id``, or None."""
        return self.state.get_state(RECORDS, f"{tenant_id}:{memory_id}")

    def put_record(self, record: MemoryRecord) -> None:
        """Store ``record`` under its own tenant; its tenant's live pages and count follow its status."""
        key = f"{record.tenant_id}:{record.memory_id}"
        before = self.state.get_state(RECORDS, key)
        self.state.put_state(RECORDS, key, record)
        was = before is not None and before.status is MemoryStatus.ACTIVE
        if was != (record.status is MemoryStatus.ACTIVE):
            self._page(record.tenant_id, record.memory_id, live=not was)

    def _page(self, tenant_id: str, memory_id: str, *, live: bool) -> None:
        key = page_key(tenant_id, memory_id)
        ids = tuple(self.state.get_state(LIVE_PAGES, key) or ())
        if (memory_id in ids) == live:
            return  # already so (a replayed write): the count already holds it
        self.state.put_state(LIVE_PAGES, key, (*ids, memory_id) if live else tuple(i for i in ids if i != memory_id))
        self.set_live_count(tenant_id, self.live_count(tenant_id) + (1 if live else -1))

    def live_count(self, tenant_id: str) -> int:
        """How many active records the tenant holds (O(1))."""
        return self.state.get_state(LIVE_COUNTS, f"{tenant_id}:") or 0

    def set_live_count(self, tenant_id: str, count: int) -> None:
        """Correct the tenant's count (an eviction round recounted its pages)."""
        self.state.put_state(LIVE_COUNTS, f"{tenant_id}:", max(count, 0))

    def live_ids(self, tenant_id: str) -> list[str]:
        """Every active memory id of the tenant, sorted (reads all its pages: for an eviction round only)."""
        pages = (self.state.get_state(LIVE_PAGES, f"{tenant_id}:p{page:02d}") or () for page in range(PAGES))
        return sorted(mid for page in pages for mid in page)

    def run_records(self, key: str) -> tuple[str, ...]:
        """The memory ids run ``key`` (``tenant:run_id``) created."""
        return tuple(self.state.get_state(RUN_RECORDS, key) or ())

    def add_run_record(self, key: str, memory_id: str) -> None:
        """Remember that run ``key`` created ``memory_id``."""
        ids = self.run_records(key)
        if memory_id not in ids:
            self.state.put_state(RUN_RECORDS, key, (*ids, memory_id))

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
        for table in (RUNS, RUN_RECORDS):
            if self.state.get_state(table, key) is not None:
                self.state.delete_state(table, key)
