"""Delegation rules: a child run inherits its parent's tenant, user, policy version and privacy.

A child run (a :class:`RunEvent` ``started`` with ``parent_run_id``) runs for its parent: same tenant (its key is
the tenant's, so it cannot name another tenant's parent at all), same user, same policy version (a child that
names none inherits its parent's), and never less private than its parent. It gets its own session scope: it may
name any session, whose session-scoped memories are its own. A child that breaks a rule is not stopped (its
tokens are counted like any run's) but the violation is refused and traced: a :class:`Decision` of kind
``rejection`` for the child run whose reason starts with the rule (``delegation_other_user``,
``delegation_other_policy``, ``delegation_privacy_downgrade``), and from then on the child is held to its
parent's facts: its effective privacy is the stricter of the two, so under a no-retention parent the memory gate
sees it as no-retention whatever it claims (privacy is never downgraded by delegation), and its own children are
checked against the facts it inherited.

Why a processor of its own rather than a part of the memory gate's run facts: the rules are about runs, not
memory (a rejection decision is the governor's, like a budget rejection), and they need facts of every started
run (user, policy version, privacy), which the memory gate keeps only for the few runs it must remember. It runs
before the memory gate in the chain; the gate asks :func:`no_retention` when it learns about a run event, so a
candidate of the child is refused as no-retention (and records of the child accepted before its start arrived
are revoked, :mod:`processors.memory.late_privacy`).

Order: a tenant's run events share a partition and its ``runs`` stream is read in offset order, so a parent's
start is applied before its children's. A child whose parent is unknown (never started, or retired a retention
window after its last event) cannot be checked: it stands on its own facts, without a decision, and is
remembered so its own children are checked against it. Replays: the table's value and the decision's id are
functions of the records, so a replayed start writes the same lineage and the same decision.

Table ``delegation_runs``: ``tenant:run_id`` -> :class:`Lineage`, forgotten when the run retires.
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
    """The facts a run holds its children to (inherited from its parent when it broke a rule)."""

    user_id: str
    policy_version: str | None
    privacy: PrivacyMode


def _dump(lineage: Lineage) -> bytes:
    return json.dumps([lineage.user_id, lineage.policy_version, lineage.privacy.value]).encode()


def _load(data: bytes) -> Lineage:
    user, policy, privacy = json.loads(data)
    return Lineage(user, policy, PrivacyMode(privacy))


def lineage(state: BudgetStore, tenant_id: str, run_id: str) -> Lineage | None:
    """What is known of a started run, or None."""
    return state.get_state(LINEAGE, run_key(tenant_id, run_id))


def no_retention(state: BudgetStore, tenant_id: str, run_id: str) -> bool:
    """Whether the run is no-retention once delegation is taken into account (its own or its parent's)."""
    known = lineage(state, tenant_id, run_id)
    return known is not None and known.privacy is PrivacyMode.NO_RETENTION


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
        own = Lineage(event.user_id, event.policy_version, event.privacy)
        parent = lineage(state, event.tenant_id, event.parent_run_id) if event.parent_run_id else None
        if parent is None:
            state.put_state(LINEAGE, run_key(event.tenant_id, event.run_id), own)
            return []
        broken = violations(event, parent)
        # Held to the parent's facts (when it broke a rule), and never less private than its parent.
        held = parent if broken else Lineage(event.user_id, event.policy_version or parent.policy_version, own.privacy)
        private = PrivacyMode.NO_RETENTION in (own.privacy, parent.privacy)
        held = Lineage(held.user_id, held.policy_version, PrivacyMode.NO_RETENTION if private else held.privacy)
        state.put_state(LINEAGE, run_key(event.tenant_id, event.run_id), held)
        if not broken:
            return []
        rules = ", ".join(b.split(":", 1)[0] for b in broken)
        reason = (
            f"{'; '.join(broken)}. Child run {event.run_id} of {event.parent_run_id} is refused as delegated "
            f"({rules}) and held to its parent's user, policy and privacy"
            f"{' (no-retention)' if private else ''} from now on"
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
