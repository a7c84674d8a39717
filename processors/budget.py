"""The budget processor: token tables in, budget decisions out (pure: no I/O, clock passed in).

``BudgetProcessor.process(event, position, state, now)`` applies one record to the :class:`BudgetStore` values
of its tenant and returns the decisions it causes. Gauges and what crossing them emits:

========================  =========================  ==================================================
gauge (stored level)      used vs limit              on a level change
========================  =========================  ==================================================
slot, total (run)         working-set tokens vs      ``budget_state``; going up with overflow
                          cap (soft at watermark,    ``evict_and_compress``: ``eviction_request``;
                          hard at cap * tier grace)  reaching hard with hard_limit reject/terminate_run,
                                                     or with overflow reject: ``rejection``
run cap, sub-agent share  run consumption            ``budget_state``; reaching hard: ``spend_exhausted``
(run), workflow cap       (usage + estimates)
spend windows (tenant,    window tokens and cost     ``budget_state`` (with ``window``); reaching hard:
user)                                                ``spend_exhausted``
========================  =========================  ==================================================

Only *transitions* emit, so a runaway loop produces one rejection, not one per item; agents that poll read
the level from the Redis projection. Every usage report emits ``usage_reconciled`` (provider prompt tokens vs
the working-set estimate) and so does every finalized run (reported, or estimated and flagged when usage is
missing or partial). Decision ids hash ``(tenant, source event, kind, subject)``: a replay reproduces them.
The exactly-once argument is in :mod:`processors.ledger`; how a run's state retires after the retention window,
and why a record later than it is refused, in :mod:`processors.retention`.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ctxflow.processors.admission import BudgetLimits
from ctxflow.processors.ledger import (
    CHILD,
    FINALIZED,
    INCOMPLETE,
    INVALIDATIONS,
    MAX_SEQ_GAP,
    RUN_CAP_GAUGE,
    RUNS,
    SHARE_GAUGE,
    STARTED,
    STREAMS,
    SUMMARIES,
    TOTAL_GAUGE,
    TURNS,
    USAGE,
    RunLedger,
    WorkflowLedger,
)
from ctxflow.processors.manifest import SLOT_INDEX, SLOTS, EffectiveBudget, Limit, check_manifest, effective_budget
from ctxflow.processors.pricing import DEFAULT_PRICES, PriceTable, prompt_tokens, usage_incomplete, usage_tokens
from ctxflow.processors.retention import DEFAULT_RETENTION, Retention, RetirementIndex, Watermark
from ctxflow.processors.tokens import ESTIMATOR, UNKNOWN, TokenCount, TokenCounter
from ctxflow.processors.transitions import DecisionEmitter
from ctxflow.processors.types import (
    BudgetStore,
    Position,
    StaticCount,
    count_key,
    run_key,
    tenant_key,
    tenant_of_key,
    user_key,
    workflow_key,
)
from ctxflow.processors.windows import SpendLedger, to_ms
from ctxflow.schemas.contract import OutsideDedupWindow, OutsideReorderWindow
from ctxflow.schemas.models import (
    AdmissionRequest,
    Decision,
    DecisionKind,
    PrivacyMode,
    RunEvent,
    RunPhase,
    Slot,
    SpendWindow,
    TenantManifest,
    TurnEvent,
    UsageReport,
    content_digest,
)
from ctxflow.schemas.models import BudgetState as Level

Event = TurnEvent | UsageReport | RunEvent | AdmissionRequest | TenantManifest
_OUTPUT = SLOT_INDEX[Slot.OUTPUT]
_SLOT_GAUGE = tuple(f"slot:{slot.value}" for slot in SLOTS)
_STATIC_SLOTS = frozenset((Slot.SYSTEM, Slot.TOOLS))
_STREAM_OF = {TurnEvent: TURNS, UsageReport: USAGE, RunEvent: RUNS}
#: Streams only the planner applies: the run ledger records their offsets when it takes their relief.
_PLANNER_STREAMS = (SUMMARIES, INVALIDATIONS)


@dataclass(frozen=True, slots=True)
class Relief:
    """The eviction planner's account of a run after a record: tokens freed per slot so far (absolute).

    ``event`` is the record (a turn, a summary, or for an invalidation the run it concerns: anything with tenant,
    user, session and run ids), ``source_id`` its id (the budget's decisions about the relief take theirs from
    it), and ``stream`` / ``offset`` where it was read (:data:`~processors.ledger.TURNS`,
    :data:`~processors.ledger.SUMMARIES` or :data:`~processors.ledger.INVALIDATIONS`).
    """

    event: Any
    source_id: str
    stream: int
    offset: int
    freed: tuple[int, ...]


@dataclass(slots=True)
class _Spend:
    """A spend ledger one record touches: ``scope`` is tenant or user; ``changed`` means it must be put."""

    scope: str
    key: str
    ledger: SpendLedger
    changed: bool = False


def _window_level(ledger: SpendLedger, window: SpendWindow, watermark: float, ms: int | None = None) -> int:
    tokens, cost = ledger.usage(window.window, ms)
    level = 0
    if window.max_tokens is not None:
        level = Limit.of(window.max_tokens, watermark).rank(tokens)
    if window.max_cost_micros is not None:
        level = max(level, Limit.of(window.max_cost_micros, watermark).rank(cost))
    return level


class BudgetProcessor:
    """Applies budget records to tenant-scoped state and returns the decisions they cause.

    Guarantees: deterministic (same records, positions and ``now`` give the same state and decisions); a
    record only reads and writes keys of its own tenant; a duplicate or a replayed record never changes a
    total twice (see :mod:`processors.ledger`); invalid manifests raise
    :class:`~processors.manifest.ManifestError` and change nothing.
    """

    def __init__(
        self, counter: TokenCounter, prices: PriceTable = DEFAULT_PRICES, retention: Retention = DEFAULT_RETENTION
    ) -> None:
        self.counter = counter
        self.prices = prices
        self.retention = retention
        self._budgets: dict[tuple[str, str | None], tuple[TenantManifest | None, EffectiveBudget]] = {}
        # Tenant -> its runs by last activity; None until built from the store (after a start or rebalance).
        self._indexes: dict[str, RetirementIndex] | None = None
        # The position and token count of the last turn applied (the planner reads it: no second count).
        self._last_count: tuple[Position, int] | None = None
        # (stream, offset) of the turn the record being applied counted (None for any other record): its relief is
        # taken even though the run ledger holds it.
        self._applied: tuple[int, int] | None = None

    def process(self, event: Event, position: Position, state: BudgetStore, now: datetime) -> list[Decision]:
        """Apply ``event`` read at ``position``; return the decisions to publish (possibly none).

        Raises :class:`~schemas.contract.OutsideDedupWindow` (changing nothing) for a run record later than the
        retention window behind its stream (:mod:`processors.retention`). The same as :meth:`admit`, then
        :meth:`apply`, then :meth:`close`: the processor chain (:mod:`processors.chain`) runs its other
        processors between the last two.
        """
        if not self.admit(event, position, state):
            return []
        out = self.apply(event, position, state, now)
        self.close(event, position, state)
        return out

    def admit(self, event: Event, pos: Position, state: BudgetStore) -> bool:
        """Whether a record is still to be applied: False when its tenant's watermark covers its offset (every
        effect of it is durable, :mod:`processors.retention`); raises ``OutsideDedupWindow`` when it is too late
        to be counted exactly once. Records of other streams are always admitted."""
        if not isinstance(event, TurnEvent | UsageReport | RunEvent):
            return True
        stream, mark = _STREAM_OF[type(event)], state.get_watermark(tenant_key(event.tenant_id)) or Watermark()
        if self._indexes is None:
            self._build_index(state)
        if pos.offset <= mark.offsets[stream]:
            return False
        if self.retention.late(to_ms(event.occurred_at), mark, stream):
            window_s = self.retention.window_ms / 1000
            raise OutsideDedupWindow(
                f"event time {event.occurred_at.isoformat()} is older than the dedup window (retention "
                f"{window_s:g} s) behind the tenant's {STREAMS[stream]} event time {_iso(mark.times[stream])}; its "
                "run's dedup state may be retired, so it cannot be counted exactly once: resend within the window "
                "or raise CTXFLOW_RUN_RETENTION_S",
                tenant_id=event.tenant_id,
                no_retention=getattr(event, "privacy", None) is PrivacyMode.NO_RETENTION,
            )
        return True

    def apply(self, event: Event, pos: Position, state: BudgetStore, now: datetime) -> list[Decision]:
        """Apply an admitted record to the token tables; return its decisions."""
        # Only this record's own turn may have its relief taken past the run ledger's offset: a turn applied by an
        # earlier record (another partition's, whose offsets are its own) must not vouch for one skipped now.
        self._applied = None
        if isinstance(event, TurnEvent):
            return self._turn(event, pos, state, now, to_ms(event.occurred_at))
        if isinstance(event, UsageReport):
            return self._usage(event, pos, state, now, to_ms(event.occurred_at))
        if isinstance(event, RunEvent):
            return self._run(event, pos, state, now, to_ms(event.occurred_at))
        if isinstance(event, AdmissionRequest):
            return [self._admission(event, state, now)]
        if isinstance(event, TenantManifest):
            key, manifest = tenant_key(event.tenant_id), check_manifest(event)
            current = state.get_manifest(key)
            if current is None or manifest.version > current.version:
                state.put_manifest(key, manifest)
            return []
        return []  # another processor's record (a summary, an invalidation): the token tables do not depend on it

    def close(self, event: Event, pos: Position, state: BudgetStore) -> list[str]:
        """Advance the tenant's watermark past an applied run record and retire the runs it makes due; returns
        the run keys retired (other processors retire their state of those runs with them)."""
        if not isinstance(event, TurnEvent | UsageReport | RunEvent):
            return []
        stream, tk = _STREAM_OF[type(event)], tenant_key(event.tenant_id)
        mark = state.get_watermark(tk) or Watermark()
        advanced = mark.advance(stream, pos.offset, to_ms(event.occurred_at))
        state.put_watermark(tk, mark)
        # Unless the cutoff moved, nothing newly filed can be due before it.
        return self._retire(event.tenant_id, mark, state) if advanced else []

    def turn_tokens(self, t: TurnEvent, pos: Position, state: BudgetStore) -> int:
        """The tokens the budget counts for turn ``t`` (what it counted, when it just applied it)."""
        if self._last_count is not None and self._last_count[0] == pos:
            return self._last_count[1]
        return self._count(t, pos, self.budget(state, t.tenant_id, t.user_id), state).tokens

    def relieve(self, relief: Relief, state: BudgetStore, now: datetime) -> list[Decision]:
        """Take ctxflow's own eviction decisions into the run's gauges: the planner's freed tokens per slot are
        assigned (not added, so a replay in any order ends the same), and each gauge that moves emits its level
        change (``budget_state`` back down to ``ok`` when enough left)."""
        key = run_key(relief.event.tenant_id, relief.event.run_id)
        run = state.get_run(key)
        if run is None:
            return []
        if relief.offset <= run.offsets[relief.stream] and (relief.stream, relief.offset) != self._applied:
            # The run ledger already holds this record and everything the planner did after it (working sets
            # are persisted after run ledgers): the planner is catching up on a replay.
            return []
        planner_stream = relief.stream in _PLANNER_STREAMS
        if planner_stream:
            run.offsets[relief.stream] = relief.offset
        if run.freed.tolist() == list(relief.freed):
            if planner_stream:
                state.put_run(key, run)
            return []
        run.freed = array("q", relief.freed)
        e = relief.event
        budget = self.budget(state, e.tenant_id, e.user_id)
        em = DecisionEmitter(e, relief.source_id, budget, now)
        for i, limit in enumerate(budget.slot_limits):
            if limit is not None and limit.rank(run.live(i)) != run.level(i):
                run.set_level(i, em.context(f"{_SLOT_GAUGE[i]}:relief", SLOTS[i], limit, run.live(i), run.level(i)))
        used, old = run.working_set(), run.level(TOTAL_GAUGE)
        if budget.total.rank(used) != old:
            run.set_level(TOTAL_GAUGE, em.context("total:relief", None, budget.total, used, old))
        state.put_run(key, run)
        return em.out

    def forget_retirement_index(self) -> None:
        """Rebuild the retirement index from the store before the next record: call it after the store's
        values were reloaded (a restart or rebalance), so runs recovered from changelogs retire too."""
        self._indexes = None

    def _touch(self, tenant_id: str, key: str, run: RunLedger, ms: int) -> None:
        """Record that ``run`` applied a record stamped ``ms`` (called before its put), for retirement."""
        if ms > run.last_ms:
            old, run.last_ms = run.last_ms, ms
            self._index_of(tenant_id).note(key, old, ms)

    def _build_index(self, state: BudgetStore) -> None:
        if self._indexes is None:
            self._indexes = {}
            for key, run in state.run_items():
                if run.last_ms >= 0:  # a ledger from before retention existed retires after its next record
                    self._index_of(tenant_of_key(key)).note(key, None, run.last_ms)

    def _index_of(self, tenant_id: str) -> RetirementIndex:
        assert self._indexes is not None
        index = self._indexes.get(tenant_id)
        if index is None:
            index = self._indexes[tenant_id] = RetirementIndex(self.retention.bucket_ms)
        return index

    def _retire(self, tenant_id: str, mark: Watermark, state: BudgetStore) -> list[str]:
        """Delete the tenant's runs last active before the cutoff, and each workflow whose last held run goes;
        returns the run keys deleted."""
        cutoff = self.retention.cutoff(mark)
        retired: list[str] = []
        if cutoff is None:
            return retired
        for key in self._index_of(tenant_id).due(cutoff):
            run = state.get_run(key)
            if run is None or run.last_ms >= cutoff:
                continue  # retired already, or active since: filed under a later bucket too
            state.delete_run(key)
            retired.append(key)
            run_id = key.split(":", 1)[1]
            if (wf := run.workflow(run_id)) is None:
                continue
            wk = workflow_key(tenant_id, wf)
            flow = state.get_workflow(wk)
            if flow is not None and all(state.get_run(run_key(tenant_id, r)) is None for r in flow.runs):
                state.delete_workflow(wk)
        return retired

    def budget(self, state: BudgetStore, tenant_id: str, user_id: str | None) -> EffectiveBudget:
        """The effective budget of ``user_id`` under the tenant's current manifest (cached per version)."""
        manifest = state.get_manifest(tenant_key(tenant_id))
        who = user_id if manifest is not None and user_id in manifest.user_overrides else None
        hit = self._budgets.get((tenant_id, who))
        if hit is not None and (
            hit[0] is manifest or (manifest is not None and hit[0] is not None and hit[0].version == manifest.version)
        ):
            return hit[1]
        budget = effective_budget(tenant_id, manifest, user_id)
        if len(self._budgets) >= 65_536:
            self._budgets.clear()
        self._budgets[(tenant_id, who)] = (manifest, budget)
        return budget

    def limits(self, state: BudgetStore, tenant_id: str) -> BudgetLimits:
        """The hard limits a new run of ``tenant_id`` starts from: the tenant's own and each overridden user's."""
        manifest = state.get_manifest(tenant_key(tenant_id))
        users = manifest.user_overrides if manifest is not None else {}
        return BudgetLimits.of(
            self.budget(state, tenant_id, None), {user: self.budget(state, tenant_id, user) for user in users}
        )

    def _turn(self, t: TurnEvent, pos: Position, state: BudgetStore, now: datetime, ms: int) -> list[Decision]:
        key = run_key(t.tenant_id, t.run_id)
        run = state.get_run(key) or RunLedger()
        if pos.offset <= run.offsets[TURNS]:
            return []
        if run.behind_window(t.seq):
            raise OutsideReorderWindow(
                f"turn seq {t.seq} of run {t.run_id} is among seqs {run.gap_from}..{run.gap_to}, declared lost when a "
                f"seq more than {MAX_SEQ_GAP} ahead arrived: it cannot be told from a duplicate, so it is not "
                f"counted; send a run's turns at most {MAX_SEQ_GAP} seqs out of order",
                tenant_id=t.tenant_id, no_retention=t.privacy is PrivacyMode.NO_RETENTION,
            )
        if not run.accept_seq(t.seq):
            return []
        budget = self.budget(state, t.tenant_id, t.user_id)
        count = self._count(t, pos, budget, state)
        self._last_count, self._applied = (pos, count.tokens), (TURNS, pos.offset)
        i = SLOT_INDEX[t.slot]
        run.tokens[i] += count.tokens
        if count.estimated:
            run.estimated_tokens += count.tokens
        run.offsets[TURNS] = pos.offset
        run.applied += 1
        run.set_model(t.model)
        run.place(t.parent_run_id, None)
        em = DecisionEmitter(t, t.event_id, budget, now)
        limit, used, old = budget.slot_limits[i], run.live(i), run.level(i)
        if limit is not None and limit.rank(used) != old:
            run.set_level(i, em.context(_SLOT_GAUGE[i], t.slot, limit, used, old))
        used, old = run.working_set(), run.level(TOTAL_GAUGE)
        if budget.total.rank(used) != old:
            run.set_level(TOTAL_GAUGE, em.context("total", None, budget.total, used, old))
        self._settle(t, run, state, em, [], consumption_changed=bool(run.flags & FINALIZED))
        self._touch(t.tenant_id, key, run, ms)
        state.put_run(key, run)
        return em.out

    def _count(self, t: TurnEvent, pos: Position, budget: EffectiveBudget, state: BudgetStore) -> TokenCount:
        """The turn's tokens; static items (system, tools) are remembered per tenant, so a later digest-only
        copy is counted the same way in every replay (the table is durable state, not a worker cache).

        A remembered count is used only if a turn at an earlier offset counted it: after a crash the count
        table may be ahead of the run ledgers, and a replayed digest-only turn must not see a count that only
        a later turn established (it did not see it the first time).
        """
        if t.slot not in _STATIC_SLOTS:
            return self.counter.count_turn(t, budget.tokenizers)
        digest = t.content_digest or content_digest(t.content or "")
        count = self.counter.count_turn(t, budget.tokenizers, digest)
        tok = self.counter.resolve(t.model, budget.tokenizers)
        key = count_key(t.tenant_id, tok.encoding or ESTIMATOR, digest)
        known = state.get_count(key)
        if known is not None and known.since > pos.offset:
            known = None
        if count.method == UNKNOWN:
            return count if known is None else TokenCount(known.tokens, not tok.exact, "digest")
        if known is None:
            state.put_count(key, StaticCount(count.tokens, pos.offset))
        return count

    def _usage(self, u: UsageReport, pos: Position, state: BudgetStore, now: datetime, ms: int) -> list[Decision]:
        key = run_key(u.tenant_id, u.run_id)
        run = state.get_run(key) or RunLedger()
        if pos.offset <= run.offsets[USAGE] or not run.accept_call(u.call_id):
            return []
        budget = self.budget(state, u.tenant_id, u.user_id)
        tokens, cost = usage_tokens(u), self.prices.usage_cost(u)
        run.offsets[USAGE] = pos.offset
        run.applied += 1
        run.reported_tokens += tokens
        run.reported_cost += cost.micros
        run.reports += 1
        if usage_incomplete(u):  # an interrupted stream, or a call logged at zero: the run's usage is estimated
            run.flags |= INCOMPLETE
        em = DecisionEmitter(u, u.event_id, budget, now)
        estimate, reported = run.working_set() - run.live(_OUTPUT), prompt_tokens(u)
        gap = reported - estimate
        em.emit(
            DecisionKind.USAGE_RECONCILED,
            "call",
            (
                f"call {u.call_id}: provider reported {reported} prompt tokens, working-set estimate "
                f"{estimate} (discrepancy {gap:+d}{f', {gap / estimate:+.1%}' if estimate else ''}); "
                f"{tokens} tokens in total, {cost.micros} micro-USD at prices {cost.version}"
                f"{' (estimated price)' if cost.estimated else ''}"
                f"{'; partial counts from an interrupted stream' if not u.complete else ''}"
            ),
            used_tokens=reported,
            estimated_tokens=0,
            discrepancy_tokens=gap,
        )
        spend = self._spend_ledgers(u, state)
        for s in spend:
            s.changed |= s.ledger.apply(STREAMS[USAGE], pos.offset, ms, tokens, cost.micros)
        self._settle(u, run, state, em, spend, consumption_changed=True)
        self._touch(u.tenant_id, key, run, ms)
        state.put_run(key, run)
        return em.out

    def _run(self, r: RunEvent, pos: Position, state: BudgetStore, now: datetime, ms: int) -> list[Decision]:
        key = run_key(r.tenant_id, r.run_id)
        run = state.get_run(key) or RunLedger()
        phase = FINALIZED if r.phase is RunPhase.FINALIZED else STARTED
        if pos.offset <= run.offsets[RUNS] or run.flags & phase:
            return []
        budget = self.budget(state, r.tenant_id, r.user_id)
        run.flags |= phase
        run.offsets[RUNS] = pos.offset
        run.applied += 1
        run.set_model(r.model, from_run_event=True)
        run.place(r.parent_run_id, r.workflow_id)
        em = DecisionEmitter(r, r.event_id, budget, now)
        spend: list[_Spend] = []
        if phase == FINALIZED:
            run.finalized_ms = ms
            spend = self._spend_ledgers(r, state)
            for s in spend:
                # The finalization time advances the windows (a linear, per-record effect, rule 2).
                s.changed |= s.ledger.apply(STREAMS[RUNS], pos.offset, ms, 0, 0)
            topup, ws = run.topup(), run.working_set()
            discrepancy: int | None = None
            if run.reports == 0:
                why = f"estimated: no usage report; consumption estimated from the working set as {ws} tokens"
            elif run.flags & INCOMPLETE:
                why = (
                    f"estimated: partial usage from an interrupted stream ({run.reported_tokens} tokens "
                    f"reported); working-set estimate adds {topup} tokens"
                )
            else:
                discrepancy = run.reported_tokens - ws
                why = (
                    f"reported: {run.reported_tokens} tokens over {run.reports} calls; working-set estimate "
                    f"{ws} (discrepancy {discrepancy:+d})"
                )
            em.emit(
                DecisionKind.USAGE_RECONCILED,
                "run",
                f"run {r.status.value if r.status else 'ended'}; {why}",
                used_tokens=run.reported_tokens + topup,
                estimated_tokens=topup,
                discrepancy_tokens=discrepancy,
            )
        self._settle(r, run, state, em, spend, consumption_changed=True)
        self._touch(r.tenant_id, key, run, ms)
        state.put_run(key, run)
        return em.out

    def _spend_ledgers(
        self, e: UsageReport | RunEvent | TurnEvent | AdmissionRequest, state: BudgetStore
    ) -> list[_Spend]:
        tk, uk = tenant_key(e.tenant_id), user_key(e.tenant_id, e.user_id)
        return [
            _Spend("tenant", tk, state.get_tenant(tk) or SpendLedger()),
            _Spend("user", uk, state.get_user(uk) or SpendLedger()),
        ]

    def _settle(
        self,
        e: TurnEvent | UsageReport | RunEvent,
        run: RunLedger,
        state: BudgetStore,
        em: DecisionEmitter,
        spend: list[_Spend],
        consumption_changed: bool,
    ) -> None:
        """Propagate the run's consumption to estimates, its workflow and the gauges; put what changed."""
        topup = run.topup()
        topup_cost = self.prices.estimate_cost(run.model, topup).micros if topup else 0
        tokens, cost = run.reported_tokens + topup, run.reported_cost + topup_cost
        if consumption_changed and run.flags & FINALIZED:
            spend = spend or self._spend_ledgers(e, state)
            for s in spend:
                entry = s.ledger.estimates.get(e.run_id)
                held = (entry[1], entry[2]) if entry else (0, 0)
                # Compared with the stored entry, not the run's previous value: this repairs a replay (rule 3).
                if held != (topup, topup_cost):
                    s.changed |= s.ledger.assign_estimate(e.run_id, run.applied, topup, topup_cost, run.finalized_ms)
        if (wf := run.workflow(e.run_id)) is not None:
            self._settle_workflow(e, wf, run.applied, tokens, cost, state, em)
        if consumption_changed:
            b = em.budget
            if b.run_cap is not None:
                old = run.level(RUN_CAP_GAUGE)
                run.set_level(RUN_CAP_GAUGE, em.spend("run_cap", "run token cap", old, b.run_cap, tokens))
            if run.flags & CHILD and b.subagent_cap is not None:
                old = run.level(SHARE_GAUGE)
                what = "sub-agent share of the workflow cap"
                run.set_level(SHARE_GAUGE, em.spend("subagent_share", what, old, b.subagent_cap, tokens))
        for s in spend:
            if s.changed:
                self._window_gauges(s.scope, s.ledger, em)
                (state.put_tenant if s.scope == "tenant" else state.put_user)(s.key, s.ledger)

    def _settle_workflow(
        self,
        e: TurnEvent | UsageReport | RunEvent,
        wf: str,
        applied: int,
        tokens: int,
        cost: int,
        state: BudgetStore,
        em: DecisionEmitter,
    ) -> None:
        key = workflow_key(e.tenant_id, wf)
        flow = state.get_workflow(key)
        entry = flow.runs.get(e.run_id) if flow is not None else None
        # Compared with the stored entry, not the run's previous value: this repairs a replay (rule 3).
        if ((entry[1], entry[2]) if entry else (0, 0)) == (tokens, cost):
            return
        flow = flow or WorkflowLedger()
        if flow.assign(e.run_id, applied, tokens, cost, e.agent_id):
            if (cap := em.budget.workflow_cap) is not None:
                flow.level = em.spend("workflow_cap", f"workflow {wf} token cap", flow.level, cap, flow.tokens)
            state.put_workflow(key, flow)

    def _window_gauges(self, scope: str, ledger: SpendLedger, em: DecisionEmitter) -> None:
        b = em.budget
        tenant = scope == "tenant"
        for w in b.tenant_windows if tenant else b.user_windows:
            old = ledger.level(w.window)
            new = _window_level(ledger, w, b.tenant_watermark if tenant else b.watermark)
            if new != old:
                used, spent = ledger.usage(w.window)
                limits = [f"{used} of {w.max_tokens} tokens"] if w.max_tokens is not None else []
                if w.max_cost_micros is not None:
                    limits.append(f"{spent} of {w.max_cost_micros} micro-USD")
                what = f"{scope} {w.window.value} spend window ({', '.join(limits)})"
                gauge = f"{scope}:{w.window.value}"
                ledger.set_level(w.window, em.change(gauge, what, old, new, used, w.max_tokens, w.window))

    def _admission(self, a: AdmissionRequest, state: BudgetStore, now: datetime) -> Decision:
        """Whether the planned slot sizes, added to the run's current usage, stay below every hard limit.

        Read-only: an admission changes no state, so answering it again (a replay) is harmless, and its id
        derives from ``request_id``.
        """
        budget = self.budget(state, a.tenant_id, a.user_id)
        run = state.get_run(run_key(a.tenant_id, a.run_id)) or RunLedger()
        em = DecisionEmitter(a, a.request_id, budget, now)
        planned_total = sum(a.planned.values())
        checks: list[tuple[str, Limit | None, int, dict[str, object]]] = []
        for slot, planned in sorted(a.planned.items(), key=lambda kv: SLOT_INDEX[kv[0]]):
            used = run.live(SLOT_INDEX[slot]) + planned
            checks.append((f"slot {slot.value}", budget.slot_limits[SLOT_INDEX[slot]], used, {"slot": slot}))
        checks.append(("total context", budget.total, run.working_set() + planned_total, {}))
        consumed = run.reported_tokens + run.topup() + planned_total
        checks.append(("run token cap", budget.run_cap, consumed, {}))
        if run.flags & CHILD:
            checks.append(("sub-agent share", budget.subagent_cap, consumed, {}))
        wf = run.workflow(a.run_id) or a.run_id
        flow = state.get_workflow(workflow_key(a.tenant_id, wf))
        checks.append(("workflow token cap", budget.workflow_cap, (flow.tokens if flow else 0) + planned_total, {}))
        ms = to_ms(a.requested_at)
        for s in self._spend_ledgers(a, state):
            scope = s.scope
            for w in budget.tenant_windows if scope == "tenant" else budget.user_windows:
                tokens, cost = s.ledger.usage(w.window, ms)
                if w.max_tokens is not None:
                    checks.append(
                        (
                            f"{scope} {w.window.value} token window",
                            Limit.of(w.max_tokens, 1.0),
                            tokens + planned_total,
                            {"window": w.window},
                        )
                    )
                if w.max_cost_micros is not None and cost >= w.max_cost_micros:
                    em.emit(
                        DecisionKind.ADMISSION,
                        "admission",
                        (
                            f"not admitted: {scope} {w.window.value} spend window has used {cost} of "
                            f"{w.max_cost_micros} micro-USD"
                        ),
                        admitted=False,
                        request_id=a.request_id,
                        window=w.window,
                        state=Level.HARD,
                        used_tokens=tokens,
                    )
                    return em.out[0]
        soft = []
        for what, limit, used, fields in checks:
            if limit is None:
                continue
            level = limit.level(used)
            if level is Level.HARD:
                em.emit(
                    DecisionKind.ADMISSION,
                    "admission",
                    (
                        f"not admitted: {what} would reach {used} tokens, hard limit {limit.hard_at} (cap "
                        f"{limit.cap}); plan fewer tokens or wait for eviction"
                    ),
                    admitted=False,
                    request_id=a.request_id,
                    state=level,
                    used_tokens=used,
                    cap_tokens=limit.cap,
                    **fields,
                )
                return em.out[0]
            if level is Level.SOFT:
                soft.append(what)
        total = run.working_set() + planned_total
        note = f"; above the soft watermark on {', '.join(soft)}: expect eviction" if soft else ""
        em.emit(
            DecisionKind.ADMISSION,
            "admission",
            (f"admitted: planned {planned_total} tokens, context would hold {total} of {budget.total.cap}{note}"),
            admitted=True,
            request_id=a.request_id,
            state=Level.SOFT if soft else Level.OK,
            used_tokens=total,
            cap_tokens=budget.total.cap,
        )
        return em.out[0]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()
