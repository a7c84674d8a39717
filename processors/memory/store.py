"""The memory processor's tables over the chain's state protocol, and every key it reads or writes.

Tables (name: key -> value), each key starting with a validated tenant id and ``:``:

* ``memory_records``: ``tenant:memory_id`` -> :class:`MemoryRecord` (the canonical record, also on the topic);
* ``memory_buckets``: ``tenant:scope:owner`` -> the live memory ids compared for duplicates and conflicts;
* ``memory_revoked``: ``tenant:memory_id`` -> the same memory id: a deleted or revoked memory, refused until a
  human approves its content again (:meth:`MemoryTables.is_revoked`; keys ``tenant:identity digest`` -> a
  tombstone's memory id are blocks written before blocks were per memory, still honoured);
* ``memory_verdicts``: ``tenant:candidate_id`` -> :class:`MemoryVerdict` (replayed for a redelivered candidate);
* ``memory_reviews``: ``tenant:review_id`` -> :class:`ReviewItem` (open questions for a reviewer);
* ``memory_runs``: ``tenant:run_id`` -> :class:`RunFacts` of a run that handled no-retention content or has a
  parent (only those: a run without either is what the gate assumes), forgotten when the run retires;
* ``memory_commands``: ``tenant:command_id`` -> how an operator's command ended (``applied`` or the refusal):
  a redelivered command changes nothing;
* ``memory_links``: what a deletion must reach, by key suffix: ``tenant:users`` -> the users with records,
  ``tenant:user:<user_id>`` -> their memory ids (produced in their runs, or owned by them),
  ``tenant:payload:<ref>`` -> the live records naming a payload (content-addressed: records may share one),
  ``tenant:refs:<memory_id>`` -> every payload and archive ref the record named,
  ``tenant:derived:<memory_id>`` -> the summaries that used the record as a source (``[summary_id, run_id,
  sources]``), ``tenant:withdrawn:<summary_id>`` -> the deleted source that withdrew a summary and its source count
  (``[memory_id, sources]``: a swap of it the planner makes later is withdrawn again);
* ``memory_expiry``: ``tenant:due`` -> the expiry buckets (hours of event time) holding records, ascending;
  ``tenant:due:<bucket>`` -> the memory ids filed under that bucket (:mod:`processors.memory.expiry`);
* ``memory_run_records``: ``tenant:run_id`` -> the memory ids the run's candidates created (revoked if the run
  turns out to be no-retention after they were accepted), forgotten when the run retires;
* ``memory_live_pages``: ``tenant:pNN`` -> the tenant's active memory ids hashed to page NN (:data:`PAGES` pages):
  what the long-term store's eviction ranks, read only when it evicts;
* ``memory_live_counts`` / ``memory_live_drops``: ``tenant:`` -> how many times a record of the tenant became
  active / stopped being active: their difference is how many active records it holds, the O(1) quota check;
* ``memory_applied``: what a judgement or a command on one record did, durable *before* the records, so that a
  replay after a crash can tell whether the records already hold it: ``tenant:candidate:<candidate_id>`` ->
  ``[memory_id, version, status]`` of the record an accepted or merged candidate wrote (the version it left the
  record at, the status its verdict named); ``tenant:command:<command_id>`` -> ``[[memory_id, version], ...]`` of
  the records a command on one record wrote, or the reason it was refused. Retired with the verdicts and command
  outcomes;
* ``memory_dedup``: the dedup window of candidates and commands (:mod:`processors.memory.dedup`): per tenant the
  largest event time of each stream, and the ids filed by the window bucket of their event time.

The live pages and counts follow every record written through :meth:`MemoryTables.put_record` (a status change
into or out of ``active``), so no transition elsewhere can forget them. A count moves only when its page did,
so a replayed write counts once; a crash between a counter and the pages can leave the count one too high, which
the next eviction round, recounting its pages, corrects (:mod:`processors.memory.quota`).

A bucket's records are read under the bucket's own tenant, so no lookup can reach another tenant's records.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from hashlib import blake2b

from ctxflow.processors.chain import TableSpec
from ctxflow.processors.memory.conflict import LIVE
from ctxflow.processors.memory.identity import bucket_key
from ctxflow.processors.memory.lifecycle import ReviewItem
from ctxflow.processors.memory.policy import RunFacts
from ctxflow.processors.types import BudgetStore
from ctxflow.schemas.models import MemoryRecord, MemoryStatus, MemoryVerdict, PrivacyMode
from pydantic import BaseModel

RECORDS, BUCKETS, REVOKED, VERDICTS, REVIEWS, RUNS, COMMANDS, LINKS, EXPIRY = (
    "memory_records",
    "memory_buckets",
    "memory_revoked",
    "memory_verdicts",
    "memory_reviews",
    "memory_runs",
    "memory_commands",
    "memory_links",
    "memory_expiry",
)
RUN_RECORDS, LIVE_PAGES, LIVE_COUNTS = "memory_run_records", "memory_live_pages", "memory_live_counts"
APPLIED, DEDUP, LIVE_DROPS = "memory_applied", "memory_dedup", "memory_live_drops"
PAGES = 64
"""Pages of a tenant's live ids: a write rewrites one page (a 64th of the tenant's live ids), eviction reads all."""


def _ids_table(name: str) -> TableSpec:
    return TableSpec(name, lambda v: json.dumps(list(v)).encode(), lambda b: tuple(json.loads(b)))


def page_key(tenant_id: str, memory_id: str) -> str:
    """The live page holding ``memory_id`` (a stable hash: the same page in every process and replay)."""
    page = int.from_bytes(blake2b(memory_id.encode(), digest_size=2).digest(), "big") % PAGES
    return f"{tenant_id}:p{page:02d}"


EXPIRY_BUCKET_MS = 3_600_000
"""Width of an expiry bucket: a record expires at the first record of its tenant after which the tenant's
event-time watermark passed the end of the hour holding its ``expires_at`` (at most an hour late, never early)."""


def expiry_bucket(at: datetime) -> int:
    """The expiry bucket of an instant (hours since the epoch)."""
    return int(at.timestamp() * 1000) // EXPIRY_BUCKET_MS


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


def _json_table(name: str) -> TableSpec:
    return TableSpec(name, lambda v: json.dumps(v).encode(), lambda b: json.loads(b))


TABLES: tuple[TableSpec, ...] = (
    _json_table(DEDUP),
    TableSpec(COMMANDS, lambda v: v.encode(), lambda b: b.decode()),
    _model_table(VERDICTS, MemoryVerdict),
    _json_table(EXPIRY),
    TableSpec(RUNS, _dump_run, _load_run),
    _ids_table(BUCKETS),
    _model_table(RECORDS, MemoryRecord),
    _json_table(APPLIED),
    TableSpec(REVOKED, lambda v: v.encode(), lambda b: b.decode()),
    TableSpec(REVIEWS, _dump_review, _load_review),
    TableSpec(LIVE_DROPS, lambda v: str(v).encode(), lambda b: int(b)),
    _ids_table(LIVE_PAGES),
    TableSpec(LIVE_COUNTS, lambda v: str(v).encode(), lambda b: int(b)),
    _ids_table(RUN_RECORDS),
    _json_table(LINKS),
)
"""The changelog forms of the memory tables, for the worker (see :class:`processors.chain.TableSpec`).

The worker persists a processor's tables one at a time, the last listed first. Why this order (a crash between
two tables replays the batch against the first durable, the second not):

* ``memory_dedup`` last: it decides which candidates and commands are too late (:mod:`.dedup`), so it never
  covers one whose effects are not durable (the budget's watermarks are persisted last for the same reason).
* ``memory_commands``, then ``memory_verdicts`` before it: a stored verdict (command outcome) is what makes a
  redelivered candidate (command) change nothing, so everything its judgement wrote is durable before it.
* ``memory_expiry`` and ``memory_runs`` after the records: what they hold makes a replay *not* act (an expiry
  bucket already taken, a run already known to be no-retention), so the tombstones that acting wrote must be
  durable first. With the records durable and these not, a replay takes the bucket or learns the run again
  and finds the tombstones there. A record filed for expiry whose filing was lost gets it again when the
  replay recognises the write (:meth:`MemoryTables.repair`).
* ``memory_buckets`` after the records: a replay that recognises its record repairs its bucket, while buckets
  ahead of their records would hide a record the replay must supersede.
* ``memory_revoked`` before the records: a block counts only while the tombstone it names is one in the records
  (:meth:`MemoryTables.is_revoked`), so a block durable ahead of its tombstone changes no replayed judgement (a
  candidate and its own deletion in one batch); a block lifted ahead of the records lifted it for a candidate that
  passes the gate anyway (human-approved).
* ``memory_applied`` just before the records: it names the record version a candidate or command left, so a
  replay compares it with the record (:meth:`MemoryTables.holds`): held, the judgement is not applied twice (a
  merge is not counted again, a review not refused); not held, the records are as the first run found them and
  the judgement is applied again.
* the live pages before the records: a replayed write then finds its id already paged and counts nothing twice.
  Around them, two counters that only grow: ``memory_live_counts`` (records made active) before the pages and
  ``memory_live_drops`` (records no longer active) after them, so a crash between a counter and the pages leaves
  the count (the first minus the second) one too high, which the next eviction round's recount corrects, and
  never too low (an eviction too late)."""


class MemoryTables:
    """Typed access to the memory tables of one state store."""

    def __init__(self, state: BudgetStore) -> None:
        self.state = state

    def record(self, tenant_id: str, memory_id: str) -> MemoryRecord | None:
        """The tenant's record ``memory_id``, or None."""
        return self.state.get_state(RECORDS, f"{tenant_id}:{memory_id}")

    def put_record(self, record: MemoryRecord) -> None:
        """Store ``record`` under its own tenant; its tenant's live pages and count follow its status, and it is
        linked to its user and payload and filed for expiry: whatever writes a record, the long-term store's
        eviction, a deletion and the retention sweep can find it."""
        tenant = record.tenant_id
        before = self.record(tenant, record.memory_id)
        self.state.put_state(RECORDS, f"{tenant}:{record.memory_id}", record)
        was = before is not None and before.status is MemoryStatus.ACTIVE
        if was != (record.status is MemoryStatus.ACTIVE):
            self._page(tenant, record.memory_id, live=not was)
        user = record.user_id
        linked = before is not None and before.user_id == user
        if user is not None and not linked and self._add_link(f"{tenant}:user:{user}", record.memory_id):
            self._add_link(f"{tenant}:users", user)
        if record.status is MemoryStatus.REVOKED:
            return
        for ref in (record.payload_ref, record.archive_ref):
            if ref is not None and self._add_link(f"{tenant}:payload:{ref}", record.memory_id):
                # Every ref the record ever named: a rehydrated record no longer names its archive, which still
                # holds its content until the record is deleted.
                self._add_link(f"{tenant}:refs:{record.memory_id}", ref)
        if record.expires_at is not None and (before is None or before.expires_at != record.expires_at):
            self._file_expiry(tenant, record.memory_id, expiry_bucket(record.expires_at))

    # ---- links: what a deletion must reach ----------------------------------------------------------------
    def _add_link(self, key: str, member: str) -> bool:
        return self._append(LINKS, key, member)

    def users(self, tenant_id: str) -> list[str]:
        """Every user of the tenant with a record (in the order they got their first)."""
        return list(self.state.get_state(LINKS, f"{tenant_id}:users") or [])

    def records_of_user(self, tenant_id: str, user_id: str) -> list[str]:
        """The memory ids produced in ``user_id``'s runs or owned by them, oldest first."""
        return list(self.state.get_state(LINKS, f"{tenant_id}:user:{user_id}") or [])

    def take_refs(self, tenant_id: str, memory_id: str) -> list[str]:
        """Every payload and archive ref the record ever named (forgotten here: its tombstone releases them)."""
        key = f"{tenant_id}:refs:{memory_id}"
        refs = self.state.get_state(LINKS, key)
        if refs is None:
            return []
        self.state.delete_state(LINKS, key)
        return list(refs)

    def release_payload(self, tenant_id: str, ref: str, memory_id: str) -> bool:
        """``memory_id`` no longer needs payload ``ref``; True when no other record of the tenant does (the
        payload may then be deleted: content-addressed, one payload can back several records)."""
        key = f"{tenant_id}:payload:{ref}"
        holders = [m for m in self.state.get_state(LINKS, key) or [] if m != memory_id]
        if holders:
            self.state.put_state(LINKS, key, holders)
            return False
        self.state.delete_state(LINKS, key)
        return True

    def names_payload(self, tenant_id: str, ref: str) -> bool:
        """Whether a live record of the tenant names payload ``ref`` (its content, or its archive)."""
        return bool(self.state.get_state(LINKS, f"{tenant_id}:payload:{ref}"))

    def add_derived(self, tenant_id: str, memory_id: str, summary_id: str, run_id: str, sources: int) -> None:
        """Summary ``summary_id`` (of run ``run_id``, over ``sources`` items) used the record as a source."""
        key = f"{tenant_id}:derived:{memory_id}"
        entries = self.state.get_state(LINKS, key) or []
        if all(e[0] != summary_id for e in entries):
            self.state.put_state(LINKS, key, [*entries, [summary_id, run_id, sources]])

    def note_withdrawn(self, tenant_id: str, summary_id: str, memory_id: str, sources: int) -> None:
        """Summary ``summary_id`` lost its text to the deletion of ``memory_id`` (one of its ``sources``)."""
        self.state.put_state(LINKS, f"{tenant_id}:withdrawn:{summary_id}", [memory_id, sources])

    def withdrawn(self, tenant_id: str, summary_id: str) -> tuple[str, int] | None:
        """The deleted source and source count of a withdrawn summary, or None."""
        found = self.state.get_state(LINKS, f"{tenant_id}:withdrawn:{summary_id}")
        return (found[0], found[1]) if found is not None else None

    def take_derived(self, tenant_id: str, memory_id: str) -> list[tuple[str, str, int]]:
        """The summaries derived from the record (forgotten here: its tombstone invalidates them once)."""
        key = f"{tenant_id}:derived:{memory_id}"
        entries = self.state.get_state(LINKS, key)
        if entries is None:
            return []
        self.state.delete_state(LINKS, key)
        return [(e[0], e[1], e[2]) for e in entries]

    # ---- expiry: records filed by the hour their retention ends ----------------------------------------------
    def _file_expiry(self, tenant_id: str, memory_id: str, bucket: int) -> None:
        if self._append(EXPIRY, f"{tenant_id}:due:{bucket}", memory_id):
            buckets = self.state.get_state(EXPIRY, f"{tenant_id}:due") or []
            if bucket not in buckets:
                self.state.put_state(EXPIRY, f"{tenant_id}:due", sorted([*buckets, bucket]))

    def _append(self, table: str, key: str, member: str) -> bool:
        """Add ``member`` to the list at ``key`` unless it is there; True when added."""
        members = self.state.get_state(table, key) or []
        if member in members:
            return False
        self.state.put_state(table, key, [*members, member])
        return True

    def first_expiry_bucket(self, tenant_id: str) -> int | None:
        """The earliest expiry bucket holding records of the tenant, or None."""
        buckets = self.state.get_state(EXPIRY, f"{tenant_id}:due")
        return buckets[0] if buckets else None

    def take_expiry_bucket(self, tenant_id: str, bucket: int) -> list[str]:
        """Empty the tenant's earliest expiry bucket ``bucket``; returns its memory ids in filing order."""
        buckets = self.state.get_state(EXPIRY, f"{tenant_id}:due") or []
        rest = [b for b in buckets if b != bucket]
        if rest:
            self.state.put_state(EXPIRY, f"{tenant_id}:due", rest)
        else:
            self.state.delete_state(EXPIRY, f"{tenant_id}:due")
        ids = self.state.get_state(EXPIRY, f"{tenant_id}:due:{bucket}") or []
        if ids:
            self.state.delete_state(EXPIRY, f"{tenant_id}:due:{bucket}")
        return list(ids)

    # ---- what a judgement or command applied: a replay's test of its own effect ---------------------------
    def applied(self, tenant_id: str, kind: str, id_: str) -> list | str | None:
        """What candidate (``kind`` ``candidate``) or command (``command``) ``id_`` wrote (a command's refusal: its
        reason), or None."""
        return self.state.get_state(APPLIED, f"{tenant_id}:{kind}:{id_}")

    def put_applied(self, tenant_id: str, kind: str, id_: str, value: list | str) -> None:
        """Remember what candidate or command ``id_`` wrote (see the ``memory_applied`` table)."""
        self.state.put_state(APPLIED, f"{tenant_id}:{kind}:{id_}", value)

    def forget_applied(self, tenant_id: str, kind: str, id_: str) -> None:
        """The id left the dedup window (:mod:`processors.memory.dedup`)."""
        if self.applied(tenant_id, kind, id_) is not None:
            self.state.delete_state(APPLIED, f"{tenant_id}:{kind}:{id_}")

    def holds(self, tenant_id: str, written: list) -> bool:
        """Whether every ``[memory_id, version, ...]`` in ``written`` is held: the record is at that version or a
        later one (versions only grow), so the write that left it there is durable."""
        for entry in written:
            record = self.record(tenant_id, entry[0])
            if record is None or record.version < entry[1]:
                return False
        return True

    def repair(self, record: MemoryRecord) -> None:
        """Bring what is persisted after the records up to ``record``: its bucket membership and its expiry
        filing (a replay that recognises a write it need not repeat; idempotent)."""
        bucket = bucket_key(record.tenant_id, record.scope, record.owner_id)
        if record.status in LIVE:
            self.add_to_bucket(bucket, record.memory_id)
        else:
            self.drop_from_bucket(bucket, record.memory_id)
        if record.expires_at is not None and record.status is not MemoryStatus.REVOKED:
            self._file_expiry(record.tenant_id, record.memory_id, expiry_bucket(record.expires_at))

    # ---- commands ----------------------------------------------------------------------------------------
    def command(self, tenant_id: str, command_id: str) -> str | None:
        """How command ``command_id`` ended (``applied`` or its refusal), or None when it was never applied."""
        return self.state.get_state(COMMANDS, f"{tenant_id}:{command_id}")

    def put_command(self, tenant_id: str, command_id: str, outcome: str) -> None:
        """Remember that a command was applied (or refused), so a redelivery changes nothing."""
        self.state.put_state(COMMANDS, f"{tenant_id}:{command_id}", outcome)

    def forget_command(self, tenant_id: str, command_id: str) -> None:
        """The command left the dedup window (:mod:`processors.memory.dedup`): its outcome and what it wrote."""
        if self.command(tenant_id, command_id) is not None:
            self.state.delete_state(COMMANDS, f"{tenant_id}:{command_id}")
        self.forget_applied(tenant_id, "command", command_id)

    def _page(self, tenant_id: str, memory_id: str, *, live: bool) -> None:
        key = page_key(tenant_id, memory_id)
        ids = tuple(self.state.get_state(LIVE_PAGES, key) or ())
        if (memory_id in ids) == live:
            return  # already so (a replayed write): the count already holds it
        self.state.put_state(LIVE_PAGES, key, (*ids, memory_id) if live else tuple(i for i in ids if i != memory_id))
        # Two counters that only grow, one persisted before the pages and one after (see TABLES): whichever
        # side of the pages a crash falls, a replay counts a move at most twice, never not at all.
        table = LIVE_COUNTS if live else LIVE_DROPS
        self.state.put_state(table, f"{tenant_id}:", (self.state.get_state(table, f"{tenant_id}:") or 0) + 1)

    def live_count(self, tenant_id: str) -> int:
        """How many active records the tenant holds (O(1)): records made active minus records no longer active."""
        added = self.state.get_state(LIVE_COUNTS, f"{tenant_id}:") or 0
        return max(added - (self.state.get_state(LIVE_DROPS, f"{tenant_id}:") or 0), 0)

    def set_live_count(self, tenant_id: str, count: int) -> None:
        """Correct the tenant's count (an eviction round recounted its pages)."""
        dropped = self.state.get_state(LIVE_DROPS, f"{tenant_id}:") or 0
        self.state.put_state(LIVE_COUNTS, f"{tenant_id}:", max(count, 0) + dropped)

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

    def is_revoked(self, tenant_id: str, memory_id: str, digest: str) -> bool:
        """Whether memory ``memory_id`` (identity digest ``digest``) was deleted or revoked and may not come back
        without review.

        A block is the memory's own (``tenant:memory_id``): one user's deletion never refuses another user's, or
        another scope's, identical content. A block written before blocks were per identity is keyed
        ``tenant:digest`` and still refuses the tenant's identical content in any scope, as it always did (an
        erasure is never undone by an upgrade); a human-approved return of the content lifts both.

        A block counts only while the tombstone it names is a tombstone in the records: the blocks are persisted
        before the records (:data:`TABLES`), so after a crash between the two a block may name a tombstone that
        is not durable yet, and the replay must judge as the first run did, before the tombstone was written."""
        for key in (f"{tenant_id}:{memory_id}", f"{tenant_id}:{digest}"):
            tomb = self.state.get_state(REVOKED, key)
            if tomb is not None and (record := self.record(tenant_id, tomb)) is not None \
                    and record.status is MemoryStatus.REVOKED:
                return True
        return False

    def block(self, tenant_id: str, memory_id: str) -> None:
        """Refuse memory ``memory_id`` from now on (its tombstone was written)."""
        self.state.put_state(REVOKED, f"{tenant_id}:{memory_id}", memory_id)

    def unblock(self, tenant_id: str, memory_id: str, digest: str) -> None:
        """Accept the memory again (a human approved its content after review), and lift an older digest-wide
        block of the same content (see :meth:`is_revoked`)."""
        for key in (f"{tenant_id}:{memory_id}", f"{tenant_id}:{digest}"):
            if self.state.get_state(REVOKED, key) is not None:
                self.state.delete_state(REVOKED, key)

    def verdict(self, tenant_id: str, candidate_id: str) -> MemoryVerdict | None:
        """The verdict already given on a candidate, or None."""
        return self.state.get_state(VERDICTS, f"{tenant_id}:{candidate_id}")

    def put_verdict(self, verdict: MemoryVerdict) -> None:
        """Remember a verdict, so a redelivered candidate gets it again."""
        self.state.put_state(VERDICTS, f"{verdict.tenant_id}:{verdict.candidate_id}", verdict)

    def forget_verdict(self, tenant_id: str, candidate_id: str) -> None:
        """The candidate left the dedup window (:mod:`processors.memory.dedup`): its verdict and what it wrote."""
        if self.verdict(tenant_id, candidate_id) is not None:
            self.state.delete_state(VERDICTS, f"{tenant_id}:{candidate_id}")
        self.forget_applied(tenant_id, "candidate", candidate_id)

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
