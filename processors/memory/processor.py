"""The memory gate as a processor of the chain: candidates in, verdicts and canonical records out.

A processor of the chain (:class:`processors.chain.Processor`), after the eviction planner and before the
envelopes: ``process(event, pos, state, now, earlier)`` over its own tables, no I/O. The tenant's policy is its
manifest's ``memory`` section (read from the budget's manifests in the same state); what the gate must know of
the producing run (its privacy, its parent) the processor learns from the run's own records (table
``memory_runs``, forgotten when the run retires), and the user it holds and its parent's session from the
delegation lineage (:mod:`processors.delegation`). Per candidate it

1. refuses a candidate later than its tenant's dedup window (:mod:`processors.memory.dedup`: the worker
   dead-letters it), replays the stored verdict if the candidate was already judged (at-least-once delivery: a
   redelivered candidate changes nothing and reproduces the same outputs), or the verdict a crash lost if the
   records already hold what the candidate wrote (``memory_applied``, :mod:`processors.memory.store`);
2. asks the gate (:mod:`processors.memory.gate`); a refusal is a ``rejected`` verdict naming the rule;
3. merges into an existing live record with the same identity (exact duplicate) or a near-duplicate in the
   same bucket (:mod:`processors.memory.conflict`): a ``merged`` verdict, the record's ``merge_count`` + 1;
4. otherwise writes the record ``provisional`` (content above the policy's inline limit goes out as a
   :class:`PayloadWrite` for the object store and the record carries ``payload_ref``), then hardens it:
   ``active``, superseding exactly the records that contradict it on subject and attribute, or
   ``quarantined`` with a :class:`~processors.memory.lifecycle.ReviewItem` when it contradicts a record with
   stronger verification or one already under review;
5. emits one :class:`MemoryVerdict` per candidate, and an :class:`Invalidation` per derived layer of each record
   that stops being retrievable (:mod:`processors.memory.cascade`);
6. after every step, tells each live run holding a memory the step's outputs stop serving: a ``stale_context``
   :class:`Decision` (:mod:`processors.memory.holders`, which also learns the holdings from turns of kind
   ``memory`` and counts each memory's reads).

It also applies operators' :class:`MemoryCommand` records (:mod:`processors.memory.commands`: review, delete;
``rehydrate``, ``pin`` and ``unpin`` are :mod:`processors.memory.store_commands`'), links summaries to the
records among their sources, and, before any record of a tenant, expires the tenant's records whose retention the
tenant's event-time watermark has passed (:mod:`processors.memory.expiry`). After an accepted candidate (and a
``rehydrate``), the tenant's long-term store is evicted to its quota's target when the write filled it
(:mod:`processors.memory.quota`: archived first, pinned never). A run learnt to be no-retention after its
candidates were accepted (its turns, run events, a no-retention candidate, or delegation under a no-retention
parent: :mod:`processors.delegation`) has the records they created revoked (:mod:`processors.memory.late_privacy`).

Every state key starts with the candidate's tenant id and ``:``, and a bucket holds one tenant, scope and owner:
no candidate can read or change another tenant's records (property-tested with tenant ids differing only in
case and shared user, session and run ids).

Its tables are in :mod:`processors.memory.store`; reviewers' decisions in :mod:`processors.memory.review`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ctxflow.processors import delegation
from ctxflow.processors.chain import TableSpec
from ctxflow.processors.memory import cascade, commands, conflict, expiry, holders, lifecycle, quota
from ctxflow.processors.memory.dedup import CANDIDATES, COMMANDS, DedupWindow
from ctxflow.processors.memory.gate import GateDecision, MemoryGate
from ctxflow.processors.memory.identity import bucket_key, candidate_memory_id, identity_digest, owner_of, verdict_id
from ctxflow.processors.memory.late_privacy import revoke_run_records
from ctxflow.processors.memory.lifecycle import ReviewItem
from ctxflow.processors.memory.policy import MemoryPolicy, RunFacts, policy_from_manifest
from ctxflow.processors.memory.review import review
from ctxflow.processors.memory.store import RECORDS, TABLES, MemoryTables
from ctxflow.processors.retention import DEFAULT_RETENTION, Retention
from ctxflow.processors.types import BudgetStore, Position, check_tenant, run_key, tenant_key
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    Invalidation,
    InvalidationKind,
    MemoryCandidate,
    MemoryCommand,
    MemoryCommandKind,
    MemoryRecord,
    MemoryStatus,
    MemoryVerdict,
    PrivacyMode,
    ReviewAction,
    RunEvent,
    Summary,
    TurnEvent,
    VerdictOutcome,
    Verification,
)

__all__ = ["RECORDS", "MemoryGateProcessor", "PayloadWrite", "payload_ref"]

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


class MemoryGateProcessor:
    """Memory governance over the chain's state protocol (see the module docstring)."""

    name = "memory_gate"
    tables: tuple[TableSpec, ...] = (*TABLES, *holders.TABLES)

    def __init__(
        self,
        gate: MemoryGate | None = None,
        policy_of: Callable[[str], MemoryPolicy] | None = None,
        access_of: quota.AccessOf = quota.recorded_access,
        retention: Retention = DEFAULT_RETENTION,
    ) -> None:
        """``policy_of`` overrides the manifests' policies (tests, benches); ``access_of`` tells the long-term
        store's eviction how often and when a record was retrieved (:mod:`processors.memory.quota`);
        ``retention`` is the dedup window of candidates and commands (:mod:`processors.memory.dedup`), the
        budget's run retention."""
        self.gate = gate or MemoryGate()
        self.dedup = DedupWindow(retention)
        self.policy_of = policy_of
        self.access_of = access_of
        #: tenant -> (manifest version, its policy): built once per manifest version.
        self._policies: dict[str, tuple[int, MemoryPolicy]] = {}

    def process(
        self, event: Any, pos: Position, state: BudgetStore, now: datetime, earlier: Sequence[Any] = ()
    ) -> Sequence[Any]:
        """Judge a :class:`MemoryCandidate`, apply a :class:`MemoryCommand`, learn run facts from turns and run
        events, which runs hold which memory from turns of kind ``memory``, and sources from summaries; before any
        record of a tenant, expire its records whose lifetime the tenant's event-time watermark has passed
        (:mod:`processors.memory.expiry`); then tell every live run holding a memory these outputs stop serving
        (:func:`processors.memory.holders.notices`: one post-step, whatever produced the outputs: supersession,
        review, deletion, expiry, store eviction, a run learnt to be no-retention late)."""
        tenant_id = getattr(event, "tenant_id", None)
        if tenant_id is None or isinstance(event, Invalidation):
            # An invalidation is this processor's own output read back for the eviction planner (topic
            # ``invalidations``): nothing in it is news here, and reacting would feed the loop.
            return []
        outputs = expiry.sweep_before(event, state)
        if isinstance(event, TurnEvent | RunEvent):
            outputs += self._learn_run(event, state)
            if isinstance(event, TurnEvent) and holders.observe(event, state):
                # A run retrieving a memory that already stopped being served (its turn read after the
                # supersession or revocation: topics have no order between them) is told at once.
                held = MemoryTables(state).record(event.tenant_id, event.item_id)
                if held is not None and held.status is not MemoryStatus.ACTIVE:
                    return [*outputs, *holders.notices([*outputs, held], state, event.event_id)]
        elif isinstance(event, MemoryCommand):
            outputs += self._command(event, state)
        elif isinstance(event, Summary):
            outputs += self._learn_sources(event, MemoryTables(state))
        elif isinstance(event, MemoryCandidate):
            outputs += self._judge(event, state)
        outputs += self._withdrawn_swaps(earlier, MemoryTables(state))
        if not outputs:
            return outputs
        outputs = cascade.keep_named_payloads(outputs, state)
        return [*outputs, *holders.notices(outputs, state, getattr(event, "event_id", None))]

    def _command(self, command: MemoryCommand, state: BudgetStore) -> list[Any]:
        tenant, tables = check_tenant(command.tenant_id), MemoryTables(state)
        late = self.dedup.late(state, tenant, COMMANDS, command.issued_at, command.command_id)
        if late is not None:
            return [late]
        self.dedup.note(state, tenant, COMMANDS, command.issued_at, command.command_id,
                        lambda retired: tables.forget_command(tenant, retired),
                        seen=tables.command(tenant, command.command_id) is not None)
        out = commands.apply(command, tables)
        if command.kind is MemoryCommandKind.REHYDRATE and any(isinstance(o, MemoryRecord) for o in out):
            out += self._enforce_quota(command.tenant_id, state, command.issued_at)
        return out

    def _judge(self, event: MemoryCandidate, state: BudgetStore) -> list[Any]:
        # The candidate's own time, not the worker's clock: records and verdicts carry it, and a replay must
        # reproduce them (and a bootstrap period's end must cut the same candidates off).
        now = event.occurred_at
        tenant = check_tenant(event.tenant_id)
        late = self.dedup.late(state, tenant, CANDIDATES, event.occurred_at, event.candidate_id)
        if late is not None:
            return [late]
        tables = MemoryTables(state)
        done = tables.verdict(tenant, event.candidate_id)
        self.dedup.note(state, tenant, CANDIDATES, event.occurred_at, event.candidate_id,
                        lambda retired: tables.forget_verdict(tenant, retired), seen=done is not None)
        if done is not None:
            return [done]
        again = self._already_applied(tables, event)
        if again is not None:
            return [again]
        learnt = self._learn_run(event, state) if event.privacy is PrivacyMode.NO_RETENTION else []
        policy = self._policy(tenant, state)
        held = delegation.lineage(state, tenant, event.run_id)
        facts = self._run_facts(event, tables)
        run = replace(facts, user_id=held.user_id if held is not None else None,
                      parent_session_id=delegation.parent_session(state, tenant, event.run_id, facts.parent_run_id))
        digest = identity_digest(event.content, event.content_digest)
        revoked = tables.is_revoked(tenant, candidate_memory_id(event), digest)
        decision = self.gate.judge(event, policy, run, now, revoked=revoked)
        if not decision.accepted:
            return [*learnt, self._verdict(tables, event, decision, policy, VerdictOutcome.REJECTED, None, now)]
        promoted = self._promote(tables, event, decision, policy, digest, now)
        return [*learnt, *promoted, *self._enforce_quota(tenant, state, now)]

    @staticmethod
    def _already_applied(tables: MemoryTables, candidate: MemoryCandidate) -> MemoryVerdict | None:
        """The verdict of a candidate whose write the records already hold, though its verdict was not durable (a
        crash between the records and the verdicts): given again, the write not repeated (a merge counted once).
        What is persisted after the records is brought up to the record (:meth:`MemoryTables.repair`)."""
        tenant = candidate.tenant_id
        written = tables.applied(tenant, "candidate", candidate.candidate_id)
        if written is None or not tables.holds(tenant, [written]):
            return None  # not applied, or the records are as the first run found them: judge it again
        record = tables.record(tenant, written[0])
        assert record is not None
        tables.repair(record)
        bucket = bucket_key(tenant, record.scope, record.owner_id)
        for gone in [r for r in tables.bucket(bucket) if r.status not in conflict.LIVE]:
            tables.drop_from_bucket(bucket, gone.memory_id)
        verdict = MemoryVerdict.model_validate(written[2])
        tables.put_verdict(verdict)
        return verdict

    def _enforce_quota(self, tenant: str, state: BudgetStore, now: datetime) -> list[Any]:
        """The tenant's long-term store evicted to its target when a write filled it (:mod:`.quota`)."""
        limits = quota.quota_of(state.get_manifest(tenant_key(tenant)))
        return quota.enforce(MemoryTables(state), tenant, limits, now, self.access_of)

    def retire(self, keys: Iterable[str], state: BudgetStore) -> None:
        """Memory outlives runs; what the processor knew of the retired runs themselves (facts, holdings) goes."""
        tables = MemoryTables(state)
        keys = list(keys)
        for key in keys:
            tables.forget_run(key)
        holders.forget_runs(keys, state)

    def forget_index(self) -> None:
        """No index over the store's values; cached policies are keyed by manifest version and stay valid."""

    def _policy(self, tenant: str, state: BudgetStore) -> MemoryPolicy:
        if self.policy_of is not None:
            return self.policy_of(tenant)
        manifest = state.get_manifest(tenant_key(tenant))
        version = manifest.version if manifest is not None else 0
        hit = self._policies.get(tenant)
        if hit is None or hit[0] != version:
            if len(self._policies) >= 65_536:
                self._policies.clear()
            hit = self._policies[tenant] = (version, policy_from_manifest(manifest))
        return hit[1]

    @staticmethod
    def _learn_run(event: TurnEvent | RunEvent | MemoryCandidate, state: BudgetStore) -> list[Any]:
        """Remember a run that handled no-retention content (its own records say so, or delegation holds it to a
        no-retention parent), and a run's parent: a candidate's own fields may claim otherwise (an agent's bug,
        or a sub-agent laundering its parent's privacy), the run's records decide. Written only when something
        is learnt, so a turn costs a lookup at most. Learning late that a run is no-retention revokes what its
        candidates already put in memory (:mod:`.late_privacy`)."""
        no_retention = event.privacy is PrivacyMode.NO_RETENTION or (
            isinstance(event, RunEvent) and delegation.no_retention(state, event.tenant_id, event.run_id))
        parent = event.parent_run_id
        if not no_retention and parent is None:
            return []
        tables = MemoryTables(state)
        key = run_key(event.tenant_id, event.run_id)
        known = tables.run(key)
        learnt = RunFacts(
            PrivacyMode.NO_RETENTION if no_retention or (known and known.privacy is PrivacyMode.NO_RETENTION)
            else PrivacyMode.RETAINED,
            parent or (known.parent_run_id if known else None),
        )
        if learnt == known:
            return []
        tables.put_run(key, learnt)
        if no_retention and (known is None or known.privacy is not PrivacyMode.NO_RETENTION):
            return revoke_run_records(tables, event.tenant_id, key, event.run_id, event.occurred_at)
        return []

    @staticmethod
    def _run_facts(candidate: MemoryCandidate, tables: MemoryTables) -> RunFacts:
        known = tables.run(run_key(candidate.tenant_id, candidate.run_id))
        if known is None:
            return RunFacts(candidate.privacy, candidate.parent_run_id)
        privacy = PrivacyMode.NO_RETENTION if PrivacyMode.NO_RETENTION in (known.privacy, candidate.privacy) \
            else PrivacyMode.RETAINED
        return RunFacts(privacy, known.parent_run_id or candidate.parent_run_id)

    def review(
        self,
        tenant_id: str,
        memory_id: str,
        action: ReviewAction,
        reviewer: str,
        state: BudgetStore,
        now: datetime,
        **correction: str | None,
    ) -> list[Any]:
        """A reviewer's decision (:func:`processors.memory.review.review`) on this processor's state."""
        out = review(MemoryTables(state), tenant_id, memory_id, action, reviewer, now, **correction)
        out = cascade.keep_named_payloads(out, state)
        return [*out, *holders.notices(out, state, None)]

    def _promote(
        self,
        tables: MemoryTables,
        candidate: MemoryCandidate,
        decision: GateDecision,
        policy: MemoryPolicy,
        digest: str,
        now: datetime,
    ) -> list[Any]:
        tenant = candidate.tenant_id
        mid = candidate_memory_id(candidate)
        owner = owner_of(candidate.scope, candidate.user_id, candidate.session_id)
        bucket = bucket_key(tenant, candidate.scope, owner)
        existing = tables.record(tenant, mid)
        if existing is not None and existing.source_candidate_id == candidate.candidate_id:
            # This candidate's own record, written before a crash that lost its verdict (the verdict table is
            # persisted last): the judgement happened; give its verdict again, never count it as a merge. The
            # bucket is persisted after the records, so it may lag them: bring it to what the records say.
            if existing.status in conflict.LIVE:
                tables.add_to_bucket(bucket, mid)
            for gone in [r for r in tables.bucket(bucket) if r.status not in conflict.LIVE]:
                tables.drop_from_bucket(bucket, gone.memory_id)
            outcome = VerdictOutcome.ACCEPTED
            return [existing, self._verdict(tables, candidate, decision, policy, outcome, existing, now)]
        if existing is not None and existing.status in conflict.LIVE:
            return self._merge(tables, candidate, decision, policy, existing, now)
        fresh = self._record(candidate, decision, policy, owner, existing, now)
        neighbours = [r for r in tables.bucket(bucket) if r.memory_id != mid]
        twin = conflict.near_duplicate(fresh, neighbours)
        if twin is not None:
            return self._merge(tables, candidate, decision, policy, twin.record, now)
        out: list[Any] = []
        if fresh.payload_ref is not None:
            out.append(PayloadWrite(tenant, fresh.payload_ref, candidate.content or ""))
            fresh = fresh.model_copy(update={"content": None})
        out.append(fresh)
        tables.add_run_record(run_key(tenant, candidate.run_id), mid)
        if existing is not None:
            # The same content back after supersession, or after a revocation a human has now reviewed: a new
            # life of the same identity (its version continues).
            tables.unblock(tenant, mid, digest)
        hardened, retired, item = self._harden(fresh, neighbours, now)
        out.append(hardened)
        tables.put_record(hardened)
        tables.add_to_bucket(bucket, hardened.memory_id)
        for old in retired:
            tables.put_record(old)
            tables.drop_from_bucket(bucket, old.memory_id)
            out += [old, *cascade.stop_serving(old, InvalidationKind.INVALIDATION, now, hardened.memory_id)]
        if item is not None:
            tables.put_review(item)
            out.append(item)
        outcome = VerdictOutcome.ACCEPTED
        out.append(self._verdict(tables, candidate, decision, policy, outcome, hardened, now))
        return out

    @staticmethod
    def _harden(
        fresh: MemoryRecord, neighbours: list[MemoryRecord], now: datetime
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
        tables: MemoryTables,
        candidate: MemoryCandidate,
        decision: GateDecision,
        policy: MemoryPolicy,
        into: MemoryRecord,
        now: datetime,
    ) -> list[Any]:
        bumped = {"merge_count": into.merge_count + 1, "version": into.version + 1}
        merged = into.model_copy(update={**bumped, "updated_at": max(now, into.updated_at)})
        # Learnt again: its lifetime counts from this write.
        merged = merged.model_copy(update={"expires_at": policy.expires_at(merged)})
        tables.put_record(merged)
        return [merged, self._verdict(tables, candidate, decision, policy, VerdictOutcome.MERGED, merged, now)]

    @staticmethod
    def _record(
        candidate: MemoryCandidate,
        decision: GateDecision,
        policy: MemoryPolicy,
        owner: str | None,
        previous: MemoryRecord | None,
        now: datetime,
    ) -> MemoryRecord:
        too_big = len((candidate.content or "").encode("utf-8")) > policy.inline_max_bytes
        record = MemoryRecord(
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
            verification=decision.verification,
            sensitivity=decision.sensitivity,
            pii_kinds=list(decision.pii_kinds),
            retention_policy=decision.retention_policy,
            policy_version=policy.version,
            parent_run_id=candidate.parent_run_id,
            produced_by_agent=candidate.produced_by_agent,
            payload_ref=payload_ref(candidate.tenant_id, candidate.content_digest) if too_big else None,
            bootstrap_loosened=decision.bootstrap_loosened,
            embedding=candidate.embedding,
        )
        return record.model_copy(update={"expires_at": policy.expires_at(record)})

    @staticmethod
    def _withdrawn_swaps(earlier: Sequence[Any], tables: MemoryTables) -> list[Any]:
        """A summary the planner swapped in after a source of it was deleted: withdrawn again, so the shell drops
        its text from Redis and the run is told at once (:func:`holders.notices`) to drop it from the prompt the
        swap just changed. The safety net for the window before the planner learns of the deletion: being earlier in
        the chain, it learns of it only when the summary's invalidation comes back to the worker on
        ``invalidations`` (a batch or so later), so a summary prepared before the deletion, or delivered after it,
        may still be swapped in meanwhile. The invalidation emitted here comes back to the planner too (a no-op
        there when the first one has taken the summary out already)."""
        out: list[Any] = []
        for swap in earlier:
            if not (isinstance(swap, Decision) and swap.kind is DecisionKind.SWAP and swap.summary is not None):
                continue
            summary_id = swap.summary.summary_id
            withdrawn = tables.withdrawn(swap.tenant_id, summary_id)
            tomb = tables.record(swap.tenant_id, withdrawn[0]) if withdrawn is not None else None
            if withdrawn is not None and tomb is not None:
                out.append(cascade.summary_invalidation(tomb, summary_id, swap.run_id, withdrawn[1], swap.decided_at))
        return out

    @staticmethod
    def _learn_sources(summary: Summary, tables: MemoryTables) -> list[Any]:
        """Remember which records a summary used (its sources that are memory ids: a retrieval turn's item id is
        the memory's), so that a record's tombstone reaches the summary; a summary of a record already deleted
        (the summarizer lagged behind the deletion) is invalidated at once."""
        tenant, out = summary.tenant_id, []
        sources = len(summary.source_ids)
        for source in dict.fromkeys(summary.source_ids):
            record = tables.record(tenant, source)
            if record is None:
                continue
            if record.status is MemoryStatus.REVOKED:
                tables.note_withdrawn(tenant, summary.summary_id, source, sources)
                out.append(cascade.summary_invalidation(record, summary.summary_id, summary.run_id, sources,
                                                        summary.produced_at))
            else:
                tables.add_derived(tenant, source, summary.summary_id, summary.run_id, sources)
        return out

    @staticmethod
    def _verdict(
        tables: MemoryTables,
        candidate: MemoryCandidate,
        decision: GateDecision,
        policy: MemoryPolicy,
        outcome: VerdictOutcome,
        record: MemoryRecord | None,
        now: datetime,
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
            status=record.status if record else None,
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
        if record is not None:
            # Ahead of the records (``memory_applied``): what a replay compares with them (_already_applied).
            tables.put_applied(candidate.tenant_id, "candidate", candidate.candidate_id,
                               [record.memory_id, record.version, verdict.model_dump(mode="json")])
        tables.put_verdict(verdict)
        return verdict
