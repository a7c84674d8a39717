"""Delegation rules: a child run inherits its parent's tenant, user, policy and privacy, and has its own session.

A child run (a :class:`RunEvent` ``started`` with ``parent_run_id``) runs for its parent: same tenant (its key is
the tenant's, so it cannot name another tenant's parent at all), same user, same policy version (a child that
names none inherits its parent's), never less private than its parent, and in a session of its own: its
session-scoped memories (owner: the session id, :mod:`processors.memory.identity`) are its own, not its parent's.
The SDK names a child's session ``<parent session>/<child run id>`` (:func:`streams.sdk.run_context.child_session`);
the worker asks only that it differ from its parent's. A child that breaks a rule is not stopped (its tokens are
counted like any run's) but the violation is refused and traced: a :class:`Decision` of kind ``rejection`` for
the child run whose reason starts with the rule (``delegation_other_user``, ``delegation_other_policy``,
``delegation_privacy_downgrade``, ``delegation_shared_session``), and from then on the child is held to its
parent's facts: its effective privacy is the stricter of the two, so under a no-retention parent the memory gate
sees it as no-retention whatever it claims (privacy is never downgraded by delegation), its own children are
checked against the facts it inherited, and the memory gate refuses its session-scope candidates that name its
parent's session (rule ``delegation_shared_session``: they would land in the parent's session memory).

Why a processor of its own rather than a part of the memory gate's run facts: the rules are about runs, not
memory (a rejection decision is the governor's, like a budget rejection), and they need facts of every started
run (user, policy version, privacy, session), which the memory gate keeps only for the few runs it must
remember. It runs before the memory gate in the chain; the gate asks :func:`no_retention` when it learns about a
run event, so a candidate of the child is refused as no-retention (and records of the child accepted before its
start arrived are revoked, :mod:`processors.memory.late_privacy`), and :func:`parent_session` when it judges a
candidate: the child's lineage names its parent's session, or, before the child's start is read, the parent's
own lineage does, so a child's candidate read before its start is refused all the same (one read before its
*parent's* start is not: the parent's session is not known yet).

Order: a tenant's run events share a partition and its ``runs`` stream is read in offset order, so a parent's
start is applied before its children's. A child whose parent is unknown (never started, or retired a retention
window after its last event) cannot be checked: it stands on its own facts, without a decision, and is
remembered so its own children are checked against it. Replays: the table's value and the decision's id are
functions of the records, so a replayed start writes the same lineage and the same decision.

Table ``delegation_runs``: ``tenant:run_id`` -> :class:`Lineage` (a JSON list: user, policy version, privacy,
session, parent's session), forgotten when the run retires. A value written before sessions were kept (three
elements) loads with both sessions unknown: the run's children, and its own candidates, are not checked for
``delegation_shared_session`` (a worker restarting on an old changelog refuses nothing it cannot know).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ctxflow.processors.chain import TableSpec
from ctxflow.processors.types import BudgetStore, Position, decision_id, run_key
from ctxflow.schemas.models import Decision, DecisionKind, PrivacyMode, RunEvent, RunPhase

LINEAGE = "delegation_runs"


@dataclass(frozen=True, slots=True)
class Lineage:
    """The facts a run holds its children to (inherited from its parent when it broke a rule).

    ``session_id`` is the session the run named at its start (its children must name another);
    ``parent_session_id`` its parent's (a session-scope candidate of the run naming it is refused). Either is None
    when unknown: a root run or a child of an unknown parent has no parent session, and a value from before
    sessions were kept has neither.
    """

    user_id: str
    policy_version: str | None
    privacy: PrivacyMode
    session_id: str | None = None
    parent_session_id: str | None = None


def _dump(lineage: Lineage) -> bytes:
    return json.dumps([lineage.user_id, lineage.policy_version, lineage.privacy.value, lineage.session_id,
                       lineage.parent_session_id]).encode()


def _load(data: bytes) -> Lineage:
    user, policy, privacy, *sessions = json.loads(data)  # three elements: written before sessions were kept
    session, parent_session = (*sessions, None, None)[:2]
    return Lineage(user, policy, PrivacyMode(privacy), session, parent_session)


def lineage(state: BudgetStore, tenant_id: str, run_id: str) -> Lineage | None:
    """What is known of a started run, or None."""
    return state.get_state(LINEAGE, run_key(tenant_id, run_id))


def no_retention(state: BudgetStore, tenant_id: str, run_id: str) -> bool:
    """Whether the run is no-retention once delegation is taken into account (its own or its parent's)."""
    known = lineage(state, tenant_id, run_id)
    return known is not None and known.privacy is PrivacyMode.NO_RETENTION


def parent_session(state: BudgetStore, tenant_id: str, run_id: str, parent_run_id: str | None) -> str | None:
    """The session of a run's parent, which the run's session-scoped memories must not name; None when unknown.

    From the run's own lineage when its start was read as a child, else from its parent's (``parent_run_id``,
    the parent the run's records name) so a candidate read before its run's start is held all the same.
    """
    own = lineage(state, tenant_id, run_id)
    if own is not None and own.parent_session_id is not None:
        return own.parent_session_id
    parent = lineage(state, tenant_id, parent_run_id) if parent_run_id else None
    return parent.session_id if parent is not None else None


def violations(child: RunEvent, parent: Lineage) -> list[str]:
    """The delegation rules ``child`` breaks against its parent's facts, each as ``rule: why``."""
    broken = []
    if child.user_id != parent.user_id:
        broken.append(f"delegation_other_user: the child names user {child.user_id}, its parent {parent.user_id}")
    if child.policy_version is not None and child.policy_version != parent.policy_version:
        broken.append(
            f"delegation_other_policy: the child names policy {child.policy_version}, its parent "
            f"{parent.policy_version or 'none'}"
        )
    if parent.privacy is PrivacyMode.NO_RETENTION and child.privacy is not PrivacyMode.NO_RETENTION:
        broken.append("delegation_privacy_downgrade: a retained child of a no-retention parent")
    if parent.session_id is not None and child.session_id == parent.session_id:
        broken.append(
            f"delegation_shared_session: the child names its parent's session {parent.session_id}, whose "
            "session-scoped memories are the parent's"
        )
    return broken


class DelegationProcessor:
    """Checks every child run's start against its parent (see the module docstring)."""

    name = "delegation"
    tables: tuple[TableSpec, ...] = (TableSpec(LINEAGE, _dump, _load),)

    def process(
        self, event: Any, pos: Position, state: BudgetStore, now: datetime, earlier: Sequence[Any] = ()
    ) -> Sequence[Any]:
        """Remember a started run's facts; a rejection decision when a child breaks a delegation rule."""
        if not isinstance(event, RunEvent) or event.phase is not RunPhase.STARTED:
            return []
        parent = lineage(state, event.tenant_id, event.parent_run_id) if event.parent_run_id else None
        if parent is None:
            own = Lineage(event.user_id, event.policy_version, event.privacy, event.session_id)
            state.put_state(LINEAGE, run_key(event.tenant_id, event.run_id), own)
            return []
        broken = violations(event, parent)
        # Held to the parent's facts (when it broke a rule), and never less private than its parent. Its session
        # stays the one it named (its children must name another), and its parent's is kept for the memory gate.
        user, policy = (parent.user_id, parent.policy_version) if broken else (
            event.user_id, event.policy_version or parent.policy_version)
        private = PrivacyMode.NO_RETENTION in (event.privacy, parent.privacy)
        privacy = PrivacyMode.NO_RETENTION if private else PrivacyMode.RETAINED
        held = Lineage(user, policy, privacy, event.session_id, parent.session_id)
        state.put_state(LINEAGE, run_key(event.tenant_id, event.run_id), held)
        if not broken:
            return []
        rules = ", ".join(b.split(":", 1)[0] for b in broken)
        shared = any(b.startswith("delegation_shared_session") for b in broken)
        reason = (
            f"{'; '.join(broken)}. Child run {event.run_id} of {event.parent_run_id} is refused as delegated "
            f"({rules}) and held to its parent's user, policy and privacy"
            f"{' (no-retention)' if private else ''} from now on"
            f"{'; its session-scope memories are refused in that session' if shared else ''}"
        )
        return [Decision(
            decision_id=decision_id(event.tenant_id, event.event_id, DecisionKind.REJECTION, "delegation"),
            tenant_id=event.tenant_id, user_id=event.user_id, session_id=event.session_id, run_id=event.run_id,
            kind=DecisionKind.REJECTION, reason=reason, source_event_id=event.event_id,
            policy_version=parent.policy_version, decided_at=event.occurred_at,
        )]

    def retire(self, keys: Iterable[str], state: BudgetStore) -> None:
        """A retired run's lineage goes (a child starting later stands on its own facts)."""
        for key in keys:
            if state.get_state(LINEAGE, key) is not None:
                state.delete_state(LINEAGE, key)

    def forget_index(self) -> None:
        """No in-memory index."""
