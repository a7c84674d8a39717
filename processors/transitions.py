"""How a budget gauge moving between levels (ok, soft watermark, hard limit) becomes decisions.

Only a change of level emits: a gauge that stays where it was emits nothing, so a runaway loop produces one
rejection, not one per item. Which decisions each gauge emits is tabled in :mod:`processors.budget`.
"""

from __future__ import annotations

from datetime import datetime

from ctxflow.processors.manifest import LEVELS, EffectiveBudget, Limit
from ctxflow.processors.types import decision_id
from ctxflow.schemas.models import (
    AdmissionRequest,
    Decision,
    DecisionKind,
    HardLimitBehaviour,
    OverflowBehaviour,
    RunEvent,
    Slot,
    SpendWindowKind,
    TurnEvent,
    UsageReport,
)


class DecisionEmitter:
    """Builds the decisions of one source record: its gauges' level changes, as the table in
    :mod:`processors.budget` says."""

    __slots__ = ("budget", "event", "now", "out", "source_id")

    def __init__(
        self,
        event: TurnEvent | UsageReport | RunEvent | AdmissionRequest,
        source_id: str,
        budget: EffectiveBudget,
        now: datetime,
    ) -> None:
        self.event, self.source_id, self.budget, self.now = event, source_id, budget, now
        self.out: list[Decision] = []

    def emit(self, kind: DecisionKind, subject: str, reason: str, **fields: object) -> None:
        e = self.event
        self.out.append(
            Decision(
                decision_id=decision_id(e.tenant_id, self.source_id, kind, subject),
                tenant_id=e.tenant_id,
                user_id=e.user_id,
                session_id=e.session_id,
                run_id=e.run_id,
                kind=kind,
                reason=reason,
                source_event_id=self.source_id,
                manifest_version=self.budget.manifest_version,
                decided_at=self.now,
                **fields,
            )
        )

    def context(self, gauge: str, slot: Slot | None, limit: Limit, used: int, old: int) -> int:
        """Emit the decisions of a slot/total gauge moving from level ``old``; return the new level."""
        new = limit.rank(used)
        if new == old:
            return new
        b, state, prev = self.budget, LEVELS[new], LEVELS[old]
        where = f"slot {slot.value}" if slot is not None else "total context"
        fields = {"slot": slot, "state": state, "used_tokens": used, "cap_tokens": limit.cap}
        self.emit(
            DecisionKind.BUDGET_STATE,
            gauge,
            (
                f"{where} went {prev.value} -> {state.value} at {used} tokens (soft from {limit.soft_at}, "
                f"hard from {limit.hard_at}; cap {limit.cap}, tier {b.tier})"
            ),
            previous_state=prev,
            **fields,
        )
        if new > old and b.overflow is OverflowBehaviour.EVICT_AND_COMPRESS:
            target = b.evict_target(limit)
            self.emit(
                DecisionKind.EVICTION_REQUEST,
                gauge,
                (
                    f"{where} holds {used} tokens, over its soft watermark ({limit.soft_at}): evict or "
                    f"compress at least {used - target} tokens to reach {target} ("
                    f"{b.qos.evict_to:.0%} of cap {limit.cap}, tier {b.tier})"
                ),
                **fields,
            )
        # A tenant that declined eviction (overflow reject) is always refused at the hard limit: with only a
        # flag, nothing would ever make room.
        rejects = b.hard_limit is not HardLimitBehaviour.FLAG or b.overflow is OverflowBehaviour.REJECT
        if new == 2 and rejects:
            if b.hard_limit is HardLimitBehaviour.TERMINATE_RUN:
                head = "run terminated by budget policy"
            else:
                head = "503 context budget exhausted, request rejected"
            self.emit(
                DecisionKind.REJECTION,
                gauge,
                (
                    f"{head}: {where} holds {used} tokens, hard limit {limit.hard_at} (cap {limit.cap}, tier "
                    f"{b.tier}). Free {where} tokens or ask the operator to raise the budget, then retry."
                ),
                **fields,
            )
        return new

    def spend(self, gauge: str, what: str, old: int, limit: Limit, used: int) -> int:
        """A run or workflow consumption gauge against ``limit``; return the new level."""
        what = f"{what} ({used} of {limit.cap} tokens)"
        return self.change(gauge, what, old, limit.rank(used), used, limit.cap, None)

    def change(
        self,
        gauge: str,
        what: str,
        old: int,
        new: int,
        used: int,
        cap: int | None,
        window: SpendWindowKind | None,
    ) -> int:
        """Emit a consumption gauge's level change (and exhaustion on reaching hard); return ``new``."""
        if new == old:
            return new
        state, prev = LEVELS[new], LEVELS[old]
        fields = {"state": state, "used_tokens": used, "cap_tokens": cap, "window": window}
        self.emit(
            DecisionKind.BUDGET_STATE,
            gauge,
            f"{what} went {prev.value} -> {state.value}",
            previous_state=prev,
            **fields,
        )
        if new == 2:
            until = "until the window resets" if window is not None else "unless the operator raises the cap"
            self.emit(
                DecisionKind.SPEND_EXHAUSTED,
                gauge,
                f"{what} is exhausted: calls are over budget {until}",
                **fields,
            )
        return new

