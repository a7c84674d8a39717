"""The fast admission check: do planned slot sizes fit a run's projected budget state?

The worker projects into Redis (:mod:`sinks.redis`), per run, the tokens the run holds per slot and has
consumed, with the hard limit of each gauge (:func:`run_headroom`), and per tenant the hard limits a run that
has used nothing starts from, the tenant's own and those of every user the manifest overrides
(:class:`BudgetLimits`). An agent reads both in one round trip and calls :func:`check_admission` before
assembling a context. The answer is advisory and can lag the stream by one batch; the authoritative answer
is the ``admission`` decision the worker publishes for an ``AdmissionRequest``, which also weighs what the
projection cannot hold per run: the workflow's cap and the spend windows, shared with other runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from ctxflow.processors.ledger import CHILD, RunLedger
from ctxflow.processors.manifest import SLOTS, EffectiveBudget
from ctxflow.schemas.models import Slot

TOTAL = "total"
#: Run-level consumption gauges beside the slots and the total.
RUN_CAP = "run"
SUBAGENT_SHARE = "subagent"
#: Gauges a whole plan adds to, in the order checked: (name, what a refusal calls it).
_WHOLE_PLAN = ((TOTAL, "total context"), (RUN_CAP, "run token cap"), (SUBAGENT_SHARE, "sub-agent share"))


@dataclass(frozen=True, slots=True)
class RunHeadroom:
    """What the projection knows of a run: tokens used and hard limits per slot, in total, and consumed by
    the run (``run``, and ``subagent`` for a sub-agent's share of its workflow)."""

    used: Mapping[str, int]
    hard_limits: Mapping[str, int]
    manifest_version: int | None = None

    def to_json(self) -> str:
        """The projection's value: ``{"used": {gauge: n}, "hard": {gauge: n}, "manifest_version": v}``."""
        return json.dumps({"used": self.used, "hard": self.hard_limits, "manifest_version": self.manifest_version},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> RunHeadroom:
        """Inverse of :meth:`to_json`."""
        value = json.loads(text)
        return cls(value["used"], value["hard"], value.get("manifest_version"))


def run_headroom(ledger: RunLedger, budget: EffectiveBudget) -> RunHeadroom:
    """A run's headroom under ``budget`` (the effective budget of the run's user): the gauges the authoritative
    admission check weighs per run, with the same usage it adds a plan to."""
    used = {slot.value: ledger.live(i) for i, slot in enumerate(SLOTS)}
    used[TOTAL] = ledger.working_set()
    hard = {slot.value: limit.hard_at for slot, limit in zip(SLOTS, budget.slot_limits, strict=True) if limit}
    hard[TOTAL] = budget.total.hard_at
    consumed = ledger.reported_tokens + ledger.topup()
    if budget.run_cap is not None:
        used[RUN_CAP], hard[RUN_CAP] = consumed, budget.run_cap.hard_at
    if budget.subagent_cap is not None and ledger.flags & CHILD:
        used[SUBAGENT_SHARE], hard[SUBAGENT_SHARE] = consumed, budget.subagent_cap.hard_at
    return RunHeadroom(used, hard, budget.manifest_version)


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """A tenant's hard limits for a run that has used nothing: the tenant's own, and per overridden user."""

    hard_limits: Mapping[str, int]
    users: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    manifest_version: int | None = None

    @classmethod
    def of(cls, tenant: EffectiveBudget, users: Mapping[str, EffectiveBudget]) -> BudgetLimits:
        """The limits of ``tenant`` (no user override) and of each user in ``users``."""
        fresh = RunLedger()
        return cls(run_headroom(fresh, tenant).hard_limits,
                   {user: run_headroom(fresh, budget).hard_limits for user, budget in users.items()},
                   tenant.manifest_version)

    def fresh_run(self, user_id: str | None) -> RunHeadroom:
        """The headroom of a run of ``user_id`` that has used nothing yet."""
        hard = self.users.get(user_id, self.hard_limits) if user_id is not None else self.hard_limits
        return RunHeadroom({}, hard, self.manifest_version)

    def to_json(self) -> str:
        """The projection's value: ``{"hard": {gauge: n}, "users": {user: {gauge: n}}, "manifest_version": v}``."""
        return json.dumps({"hard": self.hard_limits, "users": self.users, "manifest_version": self.manifest_version},
                          separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> BudgetLimits:
        """Inverse of :meth:`to_json`."""
        value = json.loads(text)
        return cls(value["hard"], value.get("users", {}), value.get("manifest_version"))


@dataclass(frozen=True, slots=True)
class AdmissionAnswer:
    """Whether a plan fits, and the reason an agent can show when it does not."""

    admitted: bool
    reason: str
    known_run: bool


def check_admission(headroom: RunHeadroom | None, planned: Mapping[Slot | str, int],
                    limits: BudgetLimits | None = None, user_id: str | None = None) -> AdmissionAnswer:
    """Admit ``planned`` (slot -> tokens) iff every slot, the total and the run's consumption stay below their
    hard limits.

    A run the projection does not know yet has used nothing: its plan is checked against its tenant's
    ``limits`` (``user_id``'s own where the manifest overrides them). With neither known it is admitted, and
    the authoritative decision on the decisions topic applies the tenant's manifest.
    """
    if any(tokens < 0 for tokens in planned.values()):
        raise ValueError("planned token counts must be non-negative")
    known = headroom is not None
    if headroom is None:
        if limits is None:
            return AdmissionAnswer(True, "admitted: run has no usage yet and no budget is projected for its "
                                   "tenant", known_run=False)
        headroom = limits.fresh_run(user_id)
    total_planned = 0
    for slot, tokens in planned.items():
        name = Slot(slot).value
        total_planned += tokens
        used = headroom.used.get(name, 0) + tokens
        limit = headroom.hard_limits.get(name)
        if limit is not None and used >= limit:
            return AdmissionAnswer(
                False, f"not admitted: slot {name} would reach {used} tokens, hard limit {limit}", known_run=known
            )
    for gauge, what in _WHOLE_PLAN:
        limit = headroom.hard_limits.get(gauge)
        used = headroom.used.get(gauge, 0) + total_planned
        if limit is not None and used >= limit:
            return AdmissionAnswer(
                False, f"not admitted: {what} would reach {used} tokens, hard limit {limit}", known_run=known
            )
    used_total = headroom.used.get(TOTAL, 0) + total_planned
    return AdmissionAnswer(True, f"admitted: total context would be {used_total} tokens", known_run=known)
