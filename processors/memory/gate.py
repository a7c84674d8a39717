"""The promotion gate: a pure decision on one memory candidate, treated like a database write.

Rules, in the order they are checked (the first that refuses decides; ``Rule`` names go on the verdict):

0. ``not_the_runs_user``: the candidate names another user than its run holds (``RunFacts.user_id``, from the
   run's start event: a refused delegation holds a child to its parent's user). Never loosened.
   ``delegation_shared_session``: a child run's session-scope candidate names its parent's session
   (``RunFacts.parent_session_id``): a child has a session scope of its own, and writing into the parent's would
   hand the parent working memory it never produced. Never loosened.
1. ``global_write_locked``: nothing is written to global scope at runtime. Never loosened.
2. ``policy_not_promotable``: a policy is never promoted from a run. Never loosened.
3. ``no_retention_run``: a candidate or run in no-retention mode never promotes. Never loosened.
4. ``content_missing``: a retained candidate must carry its content (the gate cannot scan a digest).
5. ``secret_detected``: a secret (detect-secrets' plugins) is never persisted. Never loosened.
6. ``revoked_digest``: a memory that was deleted or revoked cannot come back from the same content without review
   (a candidate approved by a human, ``verification=human_approved`` with ``verified_by``, one of the tenant's
   ``approvers`` when it lists them, is that review). The
   memory is its identity (tenant, scope, owner, type, content): another user's identical content is another
   memory, not blocked.
7. ``low_confidence``: below the tenant's ``min_confidence``.
8. Scope and type:
   - session scope: any type but policy (ephemeral working memory): ``session_memory``;
   - user scope: preferences (drafts, working style) and episodes: ``user_memory``; other types are refused
     with ``type_not_promotable_to_scope``;
   - tenant scope: facts with verification (human approval with an approver, listed in the tenant's
     ``approvers`` when it has any; a trusted system of record; or
     corroboration by ``min_corroborating_runs`` independent runs): ``tenant_verified_fact``; episodes approved
     by a human: ``tenant_approved_episode``; otherwise ``tenant_requires_verification``, unless the tenant's
     bootstrap period is running, which admits them flagged ``bootstrap_loosened`` (rule ``bootstrap_loosened``).
     Preferences and traces never reach tenant scope.
9. ``pii_without_retention_rule``: personal data (presidio) is kept only when the candidate cites a retention
   rule the tenant's policy defines; the record is then ``sensitivity=pii`` with the kinds found.

A sub-agent's output passes the same rules; its own run and its parent do not count as independent
corroboration of it. An accepted candidate's record starts ``provisional`` (hardening decides what follows).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from ctxflow.processors.memory.detectors import ContentDetectors, ContentScan
from ctxflow.processors.memory.policy import MemoryPolicy, RunFacts
from ctxflow.schemas.models import (
    MemoryCandidate,
    MemoryScope,
    MemoryType,
    PrivacyMode,
    Sensitivity,
    Verification,
)


class Rule(StrEnum):
    """The rule that decided a verdict."""

    GLOBAL_WRITE_LOCKED = "global_write_locked"
    POLICY_NOT_PROMOTABLE = "policy_not_promotable"
    NO_RETENTION_RUN = "no_retention_run"
    CONTENT_MISSING = "content_missing"
    SECRET_DETECTED = "secret_detected"
    REVOKED_DIGEST = "revoked_digest"
    LOW_CONFIDENCE = "low_confidence"
    TYPE_NOT_PROMOTABLE_TO_SCOPE = "type_not_promotable_to_scope"
    TENANT_REQUIRES_VERIFICATION = "tenant_requires_verification"
    PII_WITHOUT_RETENTION_RULE = "pii_without_retention_rule"
    SESSION_MEMORY = "session_memory"
    USER_MEMORY = "user_memory"
    TENANT_VERIFIED_FACT = "tenant_verified_fact"
    TENANT_APPROVED_EPISODE = "tenant_approved_episode"
    BOOTSTRAP_LOOSENED = "bootstrap_loosened"
    #: The candidate names another user than the run that produced it holds (its own, or its parent's after a
    #: refused delegation): one user's run never writes another user's memory. Never loosened.
    NOT_THE_RUNS_USER = "not_the_runs_user"
    #: A child run's session-scope candidate names its parent's session: a child's session memory is its own
    #: (:mod:`processors.delegation`). Never loosened.
    DELEGATION_SHARED_SESSION = "delegation_shared_session"


USER_TYPES = frozenset({MemoryType.PREFERENCE, MemoryType.EPISODE})


@dataclass(frozen=True, slots=True)
class GateDecision:
    """The gate's answer: accepted or not, the rule and a reason that never quotes the content."""

    accepted: bool
    rule: Rule
    reason: str
    bootstrap_loosened: bool = False
    sensitivity: Sensitivity = Sensitivity.NONE
    pii_kinds: tuple[str, ...] = ()
    retention_policy: str | None = None
    #: The verification the gate found to hold up, which the record keeps (it outranks weaker records in a
    #: conflict): the candidate's claim when :func:`verified` accepts it, else none, whatever was claimed.
    verification: Verification = Verification.NONE


def _refuse(rule: Rule, reason: str) -> GateDecision:
    return GateDecision(False, rule, reason)


def independent_runs(candidate: MemoryCandidate, run: RunFacts) -> frozenset[str]:
    """Corroborating runs that are independent of the candidate: not its own run nor its parent."""
    related = {candidate.run_id, candidate.parent_run_id, run.parent_run_id}
    return frozenset(candidate.corroborating_run_ids) - related


def verified(candidate: MemoryCandidate, policy: MemoryPolicy, run: RunFacts) -> str | None:
    """Why the candidate counts as verified, or None: the evidence must hold up, not only be claimed."""
    evidence = candidate.verification
    if evidence is Verification.HUMAN_APPROVED and policy.approved_by(candidate.verified_by):
        return f"approved by {candidate.verified_by}"
    if evidence is Verification.SYSTEM_OF_RECORD and candidate.verified_by in policy.trusted_systems:
        return f"confirmed by system of record {candidate.verified_by}"
    if evidence is Verification.CORROBORATED:
        runs = independent_runs(candidate, run)
        if len(runs) >= policy.min_corroborating_runs:
            return f"corroborated by {len(runs)} independent runs"
    return None


def _structural(candidate: MemoryCandidate, run: RunFacts) -> GateDecision | None:
    if run.user_id is not None and run.user_id != candidate.user_id:
        return _refuse(Rule.NOT_THE_RUNS_USER, f"the run {candidate.run_id} holds another user than the candidate")
    if candidate.scope is MemoryScope.SESSION and candidate.session_id == run.parent_session_id:
        return _refuse(Rule.DELEGATION_SHARED_SESSION,
                       f"the child run {candidate.run_id} writes into its parent's session {candidate.session_id}; "
                       "a child's session memory is its own")
    if candidate.scope is MemoryScope.GLOBAL:
        return _refuse(Rule.GLOBAL_WRITE_LOCKED, "global scope is write-locked at runtime")
    if candidate.type is MemoryType.POLICY:
        return _refuse(Rule.POLICY_NOT_PROMOTABLE, "policy is never promoted from a run")
    if PrivacyMode.NO_RETENTION in (candidate.privacy, run.privacy):
        return _refuse(Rule.NO_RETENTION_RUN, "no-retention runs never promote")
    if candidate.content is None:
        return _refuse(Rule.CONTENT_MISSING, "a retained candidate must carry its content to be scanned")
    return None


def _placement(candidate: MemoryCandidate, policy: MemoryPolicy, run: RunFacts, now: datetime) -> GateDecision:
    scope, type_ = candidate.scope, candidate.type
    if scope is MemoryScope.SESSION:
        return GateDecision(True, Rule.SESSION_MEMORY, f"session {type_.value}")
    if scope is MemoryScope.USER:
        if type_ in USER_TYPES:
            return GateDecision(True, Rule.USER_MEMORY, f"user {type_.value}")
        return _refuse(Rule.TYPE_NOT_PROMOTABLE_TO_SCOPE, f"a {type_.value} is not promoted to user scope")
    if type_ not in (MemoryType.FACT, MemoryType.EPISODE):
        return _refuse(Rule.TYPE_NOT_PROMOTABLE_TO_SCOPE, f"a {type_.value} is not promoted to tenant scope")
    if type_ is MemoryType.FACT and (why := verified(candidate, policy, run)):
        return GateDecision(True, Rule.TENANT_VERIFIED_FACT, why)
    if (type_ is MemoryType.EPISODE and candidate.verification is Verification.HUMAN_APPROVED
            and policy.approved_by(candidate.verified_by)):
        return GateDecision(True, Rule.TENANT_APPROVED_EPISODE, f"approved by {candidate.verified_by}")
    if policy.in_bootstrap(now):
        return GateDecision(
            True, Rule.BOOTSTRAP_LOOSENED, f"unverified tenant {type_.value} admitted during bootstrap", True
        )
    needs = "human approval"
    if type_ is MemoryType.FACT:
        needs += ", a trusted system of record or corroboration"
    return _refuse(Rule.TENANT_REQUIRES_VERIFICATION, f"a tenant {type_.value} needs {needs}")


def decide(
    candidate: MemoryCandidate,
    scan: ContentScan,
    policy: MemoryPolicy,
    run: RunFacts,
    now: datetime,
    *,
    revoked: bool = False,
) -> GateDecision:
    """The verdict on ``candidate`` given what the detectors found in its content (rules in the module doc).

    Pure: the same inputs always give the same decision. ``revoked`` says the candidate's memory (its identity:
    tenant, scope, owner, type, content) was deleted or revoked (:meth:`MemoryTables.is_revoked`).
    """
    decision = _decide(candidate, scan, policy, run, now, revoked)
    if decision.accepted and verified(candidate, policy, run):
        return replace(decision, verification=candidate.verification)
    return decision


def _decide(
    candidate: MemoryCandidate, scan: ContentScan, policy: MemoryPolicy, run: RunFacts, now: datetime, revoked: bool
) -> GateDecision:
    refused = _structural(candidate, run)
    if refused:
        return refused
    if scan.secrets:
        return _refuse(Rule.SECRET_DETECTED, f"secret detected ({', '.join(scan.secret_kinds)}); never persisted")
    if revoked and not (candidate.verification is Verification.HUMAN_APPROVED
                        and policy.approved_by(candidate.verified_by)):
        return _refuse(Rule.REVOKED_DIGEST, "this content was revoked; it returns only through review")
    if candidate.confidence < policy.min_confidence:
        return _refuse(Rule.LOW_CONFIDENCE, f"confidence {candidate.confidence:.2f} < {policy.min_confidence:.2f}")
    placed = _placement(candidate, policy, run, now)
    if not placed.accepted or not scan.pii:
        return placed
    kinds = scan.pii_kinds
    if candidate.retention_rule is None or candidate.retention_rule not in policy.retention_rules:
        return GateDecision(
            False,
            Rule.PII_WITHOUT_RETENTION_RULE,
            f"personal data ({', '.join(kinds)}) needs a retention rule the tenant defines",
            pii_kinds=kinds,
        )
    return GateDecision(
        True,
        placed.rule,
        f"{placed.reason}; personal data kept under {candidate.retention_rule}",
        placed.bootstrap_loosened,
        Sensitivity.PII,
        kinds,
        candidate.retention_rule,
    )


class MemoryGate:
    """The gate with its detectors built once; :meth:`judge` scans only what the structural rules let through."""

    def __init__(self, detectors: ContentDetectors | None = None) -> None:
        self.detectors = detectors or ContentDetectors()

    def judge(
        self, candidate: MemoryCandidate, policy: MemoryPolicy, run: RunFacts, now: datetime, *, revoked: bool = False
    ) -> GateDecision:
        """:func:`decide` with the candidate's content, subject, attribute and value scanned by the shared detectors
        (a record stores all four: a secret in ``value`` is as persisted as one in ``content``), each on lines of
        its own, as detect-secrets reads line by line."""
        refused = _structural(candidate, run)
        if refused:
            return refused
        stated = (candidate.content, candidate.subject, candidate.attribute, candidate.value)
        scan = self.detectors.scan("\n".join(part for part in stated if part))
        return decide(candidate, scan, policy, run, now, revoked=revoked)
