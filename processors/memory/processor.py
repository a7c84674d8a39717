"""The memory gate as a processor of the chain: candidates in, verdicts and canonical records out.

Shaped like the chain's processors (:class:`processors.chain.Processor`): ``process(event, pos, state, now)``
over its own tables, no I/O. Per candidate it

1. replays the stored verdict if the candidate was already judged (at-least-once delivery: a redelivered
   candidate changes nothing and reproduces the same outputs);
2. asks the gate (:mod:`processors.memory.gate`); a refusal is a ``rejected`` verdict naming the rule;
3. merges into an existing live record with the same identity (exact duplicate) or a near-duplicate in the
   same bucket (:mod:`processors.memory.conflict`): a ``merged`` verdict, the record's ``merge_count`` + 1;
4. otherwise writes the record ``provisional`` (content above the policy's inline limit goes out as a
   :class:`PayloadWrite` for the object store and the record carries ``payload_ref``), then hardens it:
   ``active``, superseding exactly the records that contradict it on subject and attribute, or
   ``quarantined`` with a :class:`~processors.memory.lifecycle.ReviewItem` when it contradicts a record with
   stronger verification or one already under review;
5. emits one :class:`MemoryVerdict` per candidate, and an :class:`Invalidation` per record that stops being
   retrievable.

Every state key starts with the candidate's tenant id and ``:``, and a bucket holds one tenant, scope and owner:
no candidate can read or change another tenant's records (property-tested with tenant ids differing only in
case and shared user, session and run ids).

Tables (name: key -> value): ``memory_records``: ``tenant:memory_id`` -> :class:`MemoryRecord`;
``memory_buckets``: ``tenant:scope:owner`` -> live memory ids; ``memory_revoked``: ``tenant:identity digest``
-> memory id of the tombstone; ``memory_verdicts``: ``tenant:candidate_id`` -> :class:`MemoryVerdict`;
``memory_reviews``: ``tenant:review_id`` -> :class:`ReviewItem`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from ctxflow.processors.chain import TableSpec
from ctxflow.processors.memory import conflict, lifecycle
from ctxflow.processors.memory.gate import GateDecision, MemoryGate
from ctxflow.processors.memory.identity import (
    bucket_key,
    candidate_memory_id,
    identity_digest,
    memory_id,
    owner_of,
    verdict_id,
)
from ctxflow.processors.memory.lifecycle import ReviewAction, ReviewItem
from ctxflow.processors.memory.policy import MemoryPolicy, RunFacts
from ctxflow.processors.types import BudgetStore, Position, check_tenant
from ctxflow.schemas.models import (
    Invalidation,
    InvalidationKind,
    MemoryCandidate,
    MemoryRecord,
    MemoryStatus,
    MemoryVerdict,
    ReviewState,
    VerdictOutcome,
    Verification,
    content_digest,
)
from pydantic import BaseModel

RECORDS, BUCKETS, REVOKED, VERDICTS, REVIEWS = (
    "memory_records",
    "memory_buckets",
    "memory_revoked",
    "memory_verdicts",
    "memory_reviews",
)

_STRENGTH = {
    Verification.NONE: 0,
    Verification.CORROBORATED: 1,
    Verification.SYSTEM_OF_RECORD: 2,
    Verification.HUMAN_APPROVED: 3,
}
"""How much a record's verification weighs when a newer one contradicts it: a weaker newcomer is reviewed."""


@dataclass(frozen=True, slots=True)
class PayloadWrite:
    """Content the shell must store in the object store under ``ref`` before publishing the record."""

    tenant_id: str
    ref: str
    content: str


def payload_ref(tenant_id: str, digest: str) -> str:
    """The object-store key of a content-addressed payload (tenant first: a bucket policy can isolate it)."""
    return f"{tenant_id}/sha256/{digest[:2]}/{digest}"


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


TABLES = (
    _model_table(RECORDS, MemoryRecord),
    TableSpec(BUCKETS, lambda v: json.dumps(list(v)).encode(), lambda b: tuple(json.loads(b))),
    TableSpec(REVOKED, lambda v: v.encode(), lambda b: b.decode()),
    _model_table(VERDICTS, MemoryVerdict),
    TableSpec(REVIEWS, _dump_review, _load_review),
)


class MemoryGateProcessor:
    """Memory governance over the chain's state protocol (see the module docstring)."""

    name = "memory_gate"
    tables: tuple[TableSpec, ...] = TABLES

    def __init__(
        self,
        gate: MemoryGate | None = None,
        policy_of: Callable[[str], MemoryPolicy] | None = None,
        run_facts: Callable[[str, str], RunFacts | None] | None = None,
    ) -> None:
        self.gate = gate or MemoryGate()
        self.policy_of = policy_of or (lambda _tenant: MemoryPolicy())
        self.run_facts = run_facts or (lambda _tenant, _run: None)

    # -- the chain's protocol -------------------------------------------------------------------------------
    def process(self, event: Any, pos: Position, state: BudgetStore, now: datetime) -> Sequence[Any]:
        """Judge a :class:`MemoryCandidate`; other records pass untouched (nothing returned)."""
        if not isinstance(event, MemoryCandidate):
            return []
        tenant = check_tenant(event.tenant_id)
        done = state.get_state(VERDICTS, f"{tenant}:{event.candidate_id}")
        if done is not None:
            return [done]
        policy = self.policy_of(tenant)
        run = self.run_facts(tenant, event.run_id) or RunFacts(event.privacy, event.parent_run_id)
        digest = identity_digest(event.content, event.content_digest)
        revoked = state.get_state(REVOKED, f"{tenant}:{digest}") is not None
        decision = self.gate.judge(event, policy, run, now, revoked=revoked)
        if not decision.accepted:
            return [self._verdict(event, decision, policy, VerdictOutcome.REJECTED, None, None, now, state)]
        return self._promote(event, decision, policy, digest, state, now)

    def retire(self, keys: Iterable[str], state: BudgetStore) -> None:
        """Memory outlives runs: nothing to forget when a run retires."""

    # -- promotion ------------------------------------------------------------------------------------------
    def _promote(
        self,
        candidate: MemoryCandidate,
        decision: GateDecision,
        policy: MemoryPolicy,
        digest: str,
        state: BudgetStore,
        now: datetime,
    ) -> list[Any]:
        tenant = candidate.tenant_id
        mid = candidate_memory_id(candidate)
        owner = owner_of(candidate.scope, candidate.user_id, candidate.session_id)
        bucket = bucket_key(tenant, candidate.scope, owner)
        existing: MemoryRecord | None = state.get_state(RECORDS, f"{tenant}:{mid}")
        if existing is not None and existing.status in conflict.LIVE:
            return self._merge(candidate, decision, policy, existing, state, now)
        fresh = self._record(candidate, decision, policy, owner, existing, now)
        neighbours = [r for r in self._bucket_records(bucket, state) if r.memory_id != mid]
        twin = conflict.near_duplicate(fresh, neighbours)
        if twin is not None:
            return self._merge(candidate, decision, policy, twin.record, state, now)
        out: list[Any] = []
        if fresh.payload_ref is not None:
            out.append(PayloadWrite(tenant, fresh.payload_ref, candidate.content or ""))
            fresh = fresh.model_copy(update={"content": None})
        out.append(fresh)
        if existing is not None:  # the same content back after supersession or a reviewed revocation
            state.delete_state(REVOKED, f"{tenant}:{digest}")
        hardened, changed, review = self._harden(fresh, neighbours, candidate, now)
        out.append(hardened)
        self._put(hardened, state)
        self._add_to_bucket(bucket, hardened.memory_id, state)
        for old in changed:
            self._put(old, state)
            self._drop_from_bucket(bucket, old.memory_id, state)
            out += [old, self._invalidation(old, InvalidationKind.INVALIDATION, now, hardened.memory_id)]
        if review is not None:
            state.put_state(REVIEWS, f"{tenant}:{review.review_id}", review)
            out.append(review)
        out.append(
            self._verdict(candidate, decision, policy, VerdictOutcome.ACCEPTED, hardened, hardened.status, now, state)
        )
        return out

    def _harden(
        self, fresh: MemoryRecord, neighbours: list[MemoryRecord], candidate: MemoryCandidate, now: datetime
    ) -> tuple[MemoryRecord, list[MemoryRecord], ReviewItem | None]:
        contradicted = conflict.contradictions(fresh, neighbours)
        stronger = [
            r
            for r in contradicted
            if r.status is MemoryStatus.QUARANTINED or _STRENGTH[r.verification] > _STRENGTH[fresh.verification]
        ]
        if stronger:
            ids = tuple(r.memory_id for r in stronger)
            reason = f"contradicts {', '.join(ids)} on {fresh.subject}/{fresh.attribute}, which outranks it"
            moved, item = lifecycle.quarantine(fresh, now, reason, ids)
            return moved, [], item
        if not contradicted:
            return lifecycle.activate(fresh, now), [], None
        active = lifecycle.activate(fresh, now, f"supersedes {contradicted[0].memory_id}")
        active = active.model_copy(update={"supersedes": contradicted[0].memory_id})
        return active, [lifecycle.supersede(old, active, now) for old in contradicted], None

    def _merge(
        self,
        candidate: MemoryCandidate,
        decision: GateDecision,
        policy: MemoryPolicy,
        into: MemoryRecord,
        state: BudgetStore,
        now: datetime,
    ) -> list[Any]:
        bumped = {"merge_count": into.merge_count + 1, "version": into.version + 1}
        merged = into.model_copy(update={**bumped, "updated_at": max(now, into.updated_at)})
        self._put(merged, state)
        verdict = self._verdict(candidate, decision, policy, VerdictOutcome.MERGED, merged, merged.status, now, state)
        return [merged, verdict]

    def _record(
        self,
        candidate: MemoryCandidate,
        decision: GateDecision,
        policy: MemoryPolicy,
        owner: str | None,
        previous: MemoryRecord | None,
        now: datetime,
    ) -> MemoryRecord:
        content = candidate.content or ""
        too_big = len(content.encode("utf-8")) > policy.inline_max_bytes
        return MemoryRecord(
            memory_id=candidate_memory_id(candidate),
            tenant_id=candidate.tenant_id,
            user_id=candidate.user_id,
            session_id=candidate.session_id,
            scope=candidate.scope,
            type=candidate.type,
            status=MemoryStatus.PROVISIONAL,
            version=previous.version + 1 if previous else 1,
            content=candidate.content,
            content_digest=candidate.content_digest,
            source_run_id=candidate.run_id,
            source_candidate_id=candidate.candidate_id,
            created_at=previous.created_at if previous else now,
            updated_at=now,
            reason=decision.reason,
            owner_id=owner,
            subject=candidate.subject,
            attribute=candidate.attribute,
            value=candidate.value,
            verification=candidate.verification,
            sensitivity=decision.sensitivity,
            pii_kinds=list(decision.pii_kinds),
            retention_policy=decision.retention_policy,
            policy_version=policy.version,
            parent_run_id=candidate.parent_run_id,
            produced_by_agent=candidate.produced_by_agent,
            payload_ref=payload_ref(candidate.tenant_id, candidate.content_digest) if too_big else None,
            bootstrap_loosened=decision.bootstrap_loosened,
        )

    # -- review (``ctxflow memory review``) -----------------------------------------------------------------
    def review(
        self,
        tenant_id: str,
        memory_id_: str,
        action: ReviewAction,
        reviewer: str,
        state: BudgetStore,
        now: datetime,
        *,
        corrected_content: str | None = None,
        corrected_value: str | None = None,
    ) -> list[Any]:
        """Apply a reviewer's decision to one record of ``tenant_id``; returns the records and invalidations.

        ``revoke`` applies to any record not yet revoked (a user's deletion too); ``reinstate`` and ``correct``
        only to a quarantined one. Raises :class:`~processors.memory.lifecycle.IllegalTransition` otherwise and
        ``KeyError`` for a record the tenant does not have.
        """
        tenant = check_tenant(tenant_id)
        record: MemoryRecord | None = state.get_state(RECORDS, f"{tenant}:{memory_id_}")
        if record is None:
            raise KeyError(f"{tenant} has no memory {memory_id_}")
        bucket = bucket_key(tenant, record.scope, record.owner_id)
        if action is ReviewAction.REINSTATE:
            moved = lifecycle.reinstate(record, now, reviewer)
            self._put(moved, state)
            return [moved]
        if action is ReviewAction.REVOKE:
            review_state = ReviewState.REVOKED if record.review_state is ReviewState.OPEN else None
            tomb = lifecycle.revoke(record, now, f"revoked by {reviewer}", review_state)
            self._tombstone(record, tomb, bucket, state)
            return [tomb, self._invalidation(tomb, InvalidationKind.TOMBSTONE, now, None)]
        if corrected_content is None:
            raise ValueError("a correction needs the corrected content")
        digest = content_digest(corrected_content)
        identity = identity_digest(corrected_content, digest)
        new_id = memory_id(tenant, record.scope, record.owner_id, record.type, identity)
        corrected = record.model_copy(
            update={
                "memory_id": new_id,
                "content": corrected_content,
                "content_digest": digest,
                "value": corrected_value if corrected_value is not None else record.value,
                "version": 1,
                "created_at": now,
                "supersedes": None,
                "superseded_by": None,
            }
        )
        old, new = lifecycle.correct(record, corrected, now, reviewer)
        self._tombstone(record, old, bucket, state)
        self._put(new, state)
        self._add_to_bucket(bucket, new.memory_id, state)
        return [old, new, self._invalidation(old, InvalidationKind.TOMBSTONE, now, new.memory_id)]

    def _tombstone(self, before: MemoryRecord, tomb: MemoryRecord, bucket: str, state: BudgetStore) -> None:
        self._put(tomb, state)
        self._drop_from_bucket(bucket, tomb.memory_id, state)
        digest = identity_digest(before.content, before.content_digest)
        state.put_state(REVOKED, f"{tomb.tenant_id}:{digest}", tomb.memory_id)

    # -- state helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _put(record: MemoryRecord, state: BudgetStore) -> None:
        state.put_state(RECORDS, f"{record.tenant_id}:{record.memory_id}", record)

    @staticmethod
    def _bucket_records(bucket: str, state: BudgetStore) -> list[MemoryRecord]:
        tenant = bucket.split(":", 1)[0]
        ids = state.get_state(BUCKETS, bucket) or ()
        found = (state.get_state(RECORDS, f"{tenant}:{mid}") for mid in ids)
        return [r for r in found if r is not None]

    @staticmethod
    def _add_to_bucket(bucket: str, mid: str, state: BudgetStore) -> None:
        ids = tuple(state.get_state(BUCKETS, bucket) or ())
        if mid not in ids:
            state.put_state(BUCKETS, bucket, (*ids, mid))

    @staticmethod
    def _drop_from_bucket(bucket: str, mid: str, state: BudgetStore) -> None:
        ids = tuple(state.get_state(BUCKETS, bucket) or ())
        if mid in ids:
            state.put_state(BUCKETS, bucket, tuple(i for i in ids if i != mid))

    @staticmethod
    def _invalidation(record: MemoryRecord, kind: InvalidationKind, now: datetime, by: str | None) -> Invalidation:
        return Invalidation(
            invalidation_id=verdict_id(record.tenant_id, f"{record.memory_id}@{record.version}").replace("vrd", "inv"),
            tenant_id=record.tenant_id,
            kind=kind,
            target_type="memory",
            target_id=record.memory_id,
            source_memory_id=by,
            user_id=record.user_id,
            session_id=record.session_id,
            reason=record.reason or record.status.value,
            occurred_at=now,
        )

    def _verdict(
        self,
        candidate: MemoryCandidate,
        decision: GateDecision,
        policy: MemoryPolicy,
        outcome: VerdictOutcome,
        record: MemoryRecord | None,
        status: MemoryStatus | None,
        now: datetime,
        state: BudgetStore,
    ) -> MemoryVerdict:
        reason = decision.reason
        if outcome is VerdictOutcome.MERGED and record is not None:
            reason = f"merged into {record.memory_id}"
        verdict = MemoryVerdict(
            verdict_id=verdict_id(candidate.tenant_id, candidate.candidate_id),
            tenant_id=candidate.tenant_id,
            user_id=candidate.user_id,
            session_id=candidate.session_id,
            run_id=candidate.run_id,
            candidate_id=candidate.candidate_id,
            source_event_id=candidate.event_id,
            outcome=outcome,
            status=status,
            rule=decision.rule.value,
            reason=reason,
            bootstrap_loosened=decision.bootstrap_loosened,
            memory_id=record.memory_id if record else None,
            scope=candidate.scope,
            type=candidate.type,
            pii_kinds=list(decision.pii_kinds),
            policy_version=policy.version,
            parent_run_id=candidate.parent_run_id,
            occurred_at=now,
        )
        state.put_state(VERDICTS, f"{candidate.tenant_id}:{candidate.candidate_id}", verdict)
        return verdict

