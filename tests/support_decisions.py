"""Which gauge a decision is about, and the "no decision lost" comparison between a live log and a replay.

A decision id is ``processors.types.decision_id(tenant, source event, kind, subject)``; the subject names the
gauge (``total``, ``slot:history``, ``run_cap``, ``tenant:day``...). Recomputing the id for each candidate
subject recovers the gauge without parsing reasons.

What ``processors.ledger`` promises, and so what :func:`lost_decisions` checks:

* context gauges (slot and total working set of a run) move only with the ``turns`` stream, which is replayed
  in offset order: their budget_state, eviction_request and rejection decisions are exact (same ids, same
  states and token counts) in every interleaving and after any crash; so are the eviction planner's decisions
  (evict, mask, compress, swap, offload, recall) and the relief they bring (``slot:...:relief``), as long as no
  summary arrives (summaries are a stream of their own);
* ``usage_reconciled`` and ``admission`` decisions are one per accepted record, with ids from that record;
  a call's reconciliation is exact, while a finalized run's total and an admission verdict read counters
  other topics feed, so those two are compared by id only;
* consumption gauges (run cap, sub-agent share, workflow cap, spend windows) end at the same level in every
  interleaving, but may flap on the way; so only their final level is compared: if a replay ends a gauge
  above ``ok``, the live log must hold a transition into that level (and an exhaustion when it is hard).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ctxflow.processors.types import decision_id
from ctxflow.schemas.models import BudgetState, Decision, DecisionKind, Slot, SpendWindowKind

_GAUGES = ("total", *(f"slot:{slot.value}" for slot in Slot))
CONTEXT_SUBJECTS = (*_GAUGES, *(f"{gauge}:relief" for gauge in _GAUGES))
#: The eviction planner's decisions: subjects name items, not gauges; they are exact like the context gauges.
EVICTION_KINDS = frozenset((DecisionKind.EVICT, DecisionKind.MASK, DecisionKind.COMPRESS, DecisionKind.SWAP,
                            DecisionKind.OFFLOAD, DecisionKind.RECALL))
CONSUMPTION_SUBJECTS = (
    "run_cap", "subagent_share", "workflow_cap",
    *(f"{scope}:{window.value}" for scope in ("tenant", "user") for window in SpendWindowKind),
)
_SUBJECTS: dict[DecisionKind, tuple[str, ...]] = {
    DecisionKind.BUDGET_STATE: CONTEXT_SUBJECTS + CONSUMPTION_SUBJECTS,
    DecisionKind.EVICTION_REQUEST: CONTEXT_SUBJECTS,
    DecisionKind.REJECTION: CONTEXT_SUBJECTS,
    DecisionKind.SPEND_EXHAUSTED: CONSUMPTION_SUBJECTS,
    DecisionKind.USAGE_RECONCILED: ("call", "run"),
    DecisionKind.ADMISSION: ("admission",),
}


def subject_of(d: Decision) -> str:
    """The gauge (or ``call``/``run``/``admission``) a decision is about; AssertionError if none matches."""
    if d.kind in EVICTION_KINDS:
        return "eviction"
    source = d.source_event_id or d.request_id or ""
    for subject in _SUBJECTS.get(d.kind, ()):
        if decision_id(d.tenant_id, source, d.kind, subject) == d.decision_id:
            return subject
    raise AssertionError(f"decision {d.decision_id} ({d.kind}) matches no known gauge subject")


def is_exact(d: Decision) -> bool:
    """True for decisions whose id and content do not depend on how the input topics interleave."""
    return (d.kind in (DecisionKind.USAGE_RECONCILED, DecisionKind.ADMISSION, *EVICTION_KINDS)
            or subject_of(d) in CONTEXT_SUBJECTS)


def gauge_of(d: Decision, workflows: Mapping[tuple[str, str], str]) -> tuple[str, ...]:
    """The identity of a consumption gauge: whose counter it is (run, workflow, user or tenant) and subject."""
    subject = subject_of(d)
    if subject in ("run_cap", "subagent_share"):
        return d.tenant_id, subject, d.run_id or ""
    if subject == "workflow_cap":
        return d.tenant_id, subject, workflows.get((d.tenant_id, d.run_id or ""), d.run_id or "")
    if subject.startswith("user:"):
        return d.tenant_id, subject, d.user_id or ""
    return d.tenant_id, subject


def exact_view(d: Decision) -> tuple[object, ...]:
    """What two copies of an exact decision must agree on."""
    return (d.decision_id, d.tenant_id, d.run_id, d.kind, d.slot, d.state, d.previous_state, d.used_tokens,
            d.cap_tokens, d.request_id, d.source_event_id, tuple(d.actions), d.tokens_freed)


def _id_only(d: Decision) -> bool:
    """Exact by id, not by content: an admission's verdict and a finalized run's reconciled total read
    counters that other topics feed, so they depend on the interleaving; the record that causes them does not."""
    return d.kind is DecisionKind.ADMISSION or (d.kind is DecisionKind.USAGE_RECONCILED and subject_of(d) == "run")


def lost_decisions(live: Iterable[Decision], replayed: list[Decision],
                   workflows: Mapping[tuple[str, str], str]) -> list[str]:
    """Every way ``live`` fails to cover a crash-free ``replayed`` run (empty when nothing was lost).

    ``live`` may repeat decisions (a batch replayed after a crash publishes them again under the same id).
    """
    live = list(live)
    problems: list[str] = []
    live_ids = {d.decision_id for d in live}
    live_exact = {exact_view(d) for d in live if is_exact(d) and not _id_only(d)}
    wanted = {exact_view(d) for d in replayed if is_exact(d) and not _id_only(d)}
    for d in replayed:
        if is_exact(d) and _id_only(d) and d.decision_id not in live_ids:
            problems.append(f"lost: {d.kind.value} {subject_of(d)} run {d.run_id}")
    problems += [f"lost or altered: {v[3]} run {v[2]} state {v[5]} used {v[7]}" for v in wanted - live_exact]
    problems += [f"spurious: {v[3]} run {v[2]} state {v[5]} used {v[7]}" for v in live_exact - wanted]
    final: dict[tuple[str, ...], BudgetState] = {}
    for d in replayed:
        if d.kind is DecisionKind.BUDGET_STATE and not is_exact(d) and d.state is not None:
            final[gauge_of(d, workflows)] = d.state
    reached = {(gauge_of(d, workflows), d.kind, d.state) for d in live if not is_exact(d)}
    for gauge, state in final.items():
        if state is BudgetState.OK:
            continue
        if (gauge, DecisionKind.BUDGET_STATE, state) not in reached:
            problems.append(f"gauge {gauge} ends {state.value} but the live log never announced it")
        if state is BudgetState.HARD and (gauge, DecisionKind.SPEND_EXHAUSTED, state) not in reached:
            problems.append(f"gauge {gauge} is exhausted but the live log has no spend_exhausted for it")
    return problems
