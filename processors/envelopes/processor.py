"""The envelope processor: run envelopes and cost lines from run boundaries and the events between them.

A processor of the chain (:mod:`processors.chain`), after the eviction planner. Per accepted event of a run it
updates the run's :class:`~processors.envelopes.state.RunState` in O(1): context tokens by layer and static
prefix (the tokens the budget counted), provider usage, retrievals, tool calls, the planner's evictions and
compressions (read from ``earlier``, what the chain's earlier processors published for the record), promotions
proposed (memory candidates), the integrity chains; and it prices the event's surfaces into cost lines
(:mod:`processors.envelopes.costs`). The envelope itself is published only at the run's boundaries: when the
run closes, and again whenever a later record changes a closed run.

Closing. A finalized run event closes a run (``closed_by = agent``). A run that never finalizes (its agent was
killed) is closed by the worker once its tenant's event-time watermark (the least of its three streams', turns,
usage and runs: :mod:`processors.retention`) passes ``last_event_at + idle timeout``: status ``abandoned``,
``closed_by = idle_timeout``, ``finalized_at = last_event_at + idle timeout`` (a function of the run's events,
so every replay closes it the same way). Open runs are filed by deadline in a
:class:`~processors.retention.RetirementIndex` (buckets of a sixteenth of the timeout), so a record costs
nothing per open run: a run closes at the first record after which the watermark passed the end of its
deadline's bucket (the same record whether the index lived through a restart or was rebuilt from the store). A
later event of an abandoned run reopens it (the agent was not dead after all) until its finalization or the next
idle timeout. Unlike retirement, which takes the streams that carried any of the tenant's records, closing
waits for all three: a stream silent so far may be one the worker has not read yet, and a replay reading it
first would see the run's records before the deadline passed (so a tenant that sends no usage reports at all
has no runs closed by the idle timeout; they still close when they finalize).

Consumption a closed run's usage reports do not account for (none, a partial stream, or a call logged at zero:
:func:`~processors.pricing.usage_incomplete`) is estimated as the run ledger estimates it (every token counted
into the context, less the tokens reported) and priced as uncached input: ``usage_estimated``, and a closure
line of surface inference flagged ``estimated``, never zero. The run's retained content is priced as storage
for ``storage_days`` (an estimate).

Determinism. Everything published is a function of the run's accepted events and the settings: counts and
sums are order-free; chains are per stream, in orders a replay reproduces (:mod:`processors.envelopes.integrity`);
a closure's time comes from the events; ``envelope_version`` is twice the records that changed the run, plus one
once closed, so the fullest envelope of a run has the highest version however often the run was emitted on the
way (a replay that interleaves the streams differently emits at other moments, never a higher version with less).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import TableSpec
from ctxflow.processors.envelopes.costs import Lineage, PendingLine, closure_source, publish
from ctxflow.processors.envelopes.integrity import combine, run_form, step, turn_form, usage_form
from ctxflow.processors.envelopes.layers import LAYERS, is_static, layer_of
from ctxflow.processors.envelopes.records import trusted
from ctxflow.processors.envelopes.state import (
    ABANDONED,
    CANDIDATES,
    CHANGES,
    CLOSED,
    COMPRESSIONS,
    EVENTS,
    EVICTIONS,
    FINALIZED,
    FINALIZED_MS,
    FIRST_MS,
    FLAGS,
    FREED,
    GUESSED,
    INCOMPLETE,
    INFERENCE_MICROS,
    LAST_MS,
    LAYER_TOKENS,
    LINEAGE,
    OFFSETS,
    PRIVATE,
    PROMOTIONS,
    REPORTS,
    RETAINED_BYTES,
    RETRIEVAL_MICROS,
    RETRIEVALS,
    RUN_MODEL,
    RUNS,
    STARTED,
    STARTED_MS,
    STATIC_TOKENS,
    STATUS,
    STATUS_INDEX,
    STATUSES,
    SUMMARIES,
    TOOL_CALLS,
    TOOL_RESULTS,
    TOOLING_MICROS,
    TURNS,
    USAGE,
    USAGE_TOKENS,
    RunState,
    intern_id,
    new_state,
)
from ctxflow.processors.ledger import RUNS as RUNS_STREAM
from ctxflow.processors.ledger import TURNS as TURNS_STREAM
from ctxflow.processors.ledger import USAGE as USAGE_STREAM
from ctxflow.processors.pricing import Cost, PriceTable, usage_incomplete, usage_tokens
from ctxflow.processors.retention import RetirementIndex
from ctxflow.processors.types import BudgetStore, Position, run_key, tenant_key, tenant_of_key
from ctxflow.processors.windows import from_ms, to_ms
from ctxflow.schemas.models import (
    ClosedBy,
    CostLine,
    CostSurface,
    CostUnit,
    Decision,
    DecisionKind,
    EnvelopeStatus,
    ItemKind,
    MemoryCandidate,
    MemoryScope,
    PrivacyMode,
    RunEnvelope,
    RunEvent,
    RunPhase,
    Summary,
    TurnEvent,
    UsageReport,
)

#: The processor's table: one run state per run.
TABLE = "envelopes"
#: Event time after a run's last event at which the worker closes it as abandoned (``CTXFLOW_RUN_IDLE_TIMEOUT_S``).
DEFAULT_IDLE_TIMEOUT_S = 30 * 60
#: Days a run's retained content is taken to be stored, to price persistence (``CTXFLOW_CONTENT_STORAGE_DAYS``).
DEFAULT_STORAGE_DAYS = 30
#: Parents walked to find a run's depth (a cycle in bad data must not loop).
MAX_DEPTH = 64

_STREAM_OF = {TurnEvent: TURNS_STREAM, UsageReport: USAGE_STREAM, RunEvent: RUNS_STREAM}
# Enum members and values bound once: an enum member lookup costs about as much as a dict lookup on this path.
_TOOL_CALL, _TOOL_RESULT, _MEMORY = ItemKind.TOOL_CALL, ItemKind.TOOL_RESULT, ItemKind.MEMORY
_RETAINED = PrivacyMode.RETAINED
_INFERENCE, _RETRIEVAL, _TOOLING, _PERSISTENCE = (s.value for s in (
    CostSurface.INFERENCE, CostSurface.RETRIEVAL, CostSurface.TOOLING, CostSurface.PERSISTENCE))
_TOKENS, _CALLS, _BYTE_DAYS = CostUnit.TOKENS.value, CostUnit.CALLS.value, CostUnit.BYTE_DAYS.value
_EVICTING = frozenset((DecisionKind.EVICT, DecisionKind.MASK, DecisionKind.OFFLOAD))
_RETRIEVED = frozenset((ItemKind.RETRIEVED_CHUNK, ItemKind.MEMORY))
_SCOPE_INDEX = {scope: i for i, scope in enumerate(MemoryScope)}
_SCOPES = tuple(MemoryScope)
_OPEN = STATUS_INDEX[EnvelopeStatus.OPEN]
_ABANDONED = STATUS_INDEX[EnvelopeStatus.ABANDONED]

Output = RunEnvelope | CostLine


class EnvelopeProcessor:
    """Materializes run envelopes and cost lines (module docstring); pure and deterministic.

    Guarantees: a record changes only its own run's state (and closes only its own tenant's idle runs); a
    duplicate or replayed record changes nothing twice; the envelopes and cost lines published for a run end
    the same in every replay of the log.
    """

    name = "envelopes"
    tables = (TableSpec(TABLE, RunState.to_bytes, RunState.from_bytes),)

    def __init__(
        self, budget: BudgetProcessor, prices: PriceTable | None = None, *, idle_timeout_s: float | None = None,
        storage_days: float | None = None,
    ) -> None:
        self.budget = budget
        self.prices = prices or budget.prices
        self.idle_ms = max(int((DEFAULT_IDLE_TIMEOUT_S if idle_timeout_s is None else idle_timeout_s) * 1000), 1)
        self.storage_days = int(DEFAULT_STORAGE_DAYS if storage_days is None else storage_days)
        # Tenant -> its open runs by deadline; None until built from the store (after a start or rebalance).
        self._idle: dict[str, RetirementIndex] | None = None
        self._one_retrieval, self._one_call = self.prices.retrieval_cost(1), self.prices.tool_cost(1)

    # ---- the processor interface ------------------------------------------------------------------------------
    def process(
        self, event: Any, pos: Position, state: BudgetStore, now: datetime, earlier: Sequence[Any] = ()
    ) -> list[Output]:
        """Apply one record; returns the envelopes and cost lines it publishes."""
        if self._idle is None:
            self._build_index(state)
        kind = type(event)
        if kind is TurnEvent:
            ms = to_ms(event.occurred_at)
            out = self._turn(event, ms, pos, state, earlier)
        elif kind is UsageReport:
            ms = to_ms(event.occurred_at)
            out = self._usage(event, ms, pos, state)
        elif kind is RunEvent:
            ms = to_ms(event.occurred_at)
            out = self._run(event, ms, pos, state)
        elif kind is MemoryCandidate:
            return self._candidate(event, pos, state)
        elif kind is Summary:
            return self._summary(event, pos, state, earlier)
        else:
            return []
        return self._close_idle(event.tenant_id, _STREAM_OF[kind], ms, state, out)

    def retire(self, keys: Iterable[str], state: BudgetStore) -> None:
        """Forget the states of runs the budget retired (their envelopes were published when they closed)."""
        for key in keys:
            state.delete_state(TABLE, key)

    def forget_index(self) -> None:
        """Rebuild the deadlines of open runs from the store before the next record (after a reload)."""
        self._idle = None

    # ---- records ----------------------------------------------------------------------------------------------
    def _turn(self, t: TurnEvent, ms: int, pos: Position, state: BudgetStore, earlier: Sequence[Any]
              ) -> list[Output]:
        if (opened := self._open(t, TURNS, pos, state)) is None:
            return []
        key, rs = opened
        n = rs.n
        if not rs.accept_seq(t.seq):
            state.put_state(TABLE, key, rs)
            return []
        rs.chain_turn(t.seq, turn_form(t, ms))
        out: list[Output] = []
        tokens = self.budget.turn_tokens(t, pos, state)
        n[LAYER_TOKENS + layer_of(t)] += tokens
        if is_static(t):
            n[STATIC_TOKENS] += tokens
        if not n[FLAGS] & RUN_MODEL and t.model != rs.model:
            rs.model = intern_id(t.model)
        if t.privacy is not _RETAINED:
            rs.flag(PRIVATE)
        elif (content := t.content) is not None:
            n[RETAINED_BYTES] += len(content) if content.isascii() else len(content.encode())
        if not n[FLAGS] & LINEAGE:
            if t.parent_run_id is None:  # a root run: its own workflow (the contract's rule for run events)
                rs.workflow_id = intern_id(t.run_id)
                self._learn_lineage(rs, t.tenant_id, t.run_id, state, out)
            elif rs.parent_run_id is None:
                rs.parent_run_id = intern_id(t.parent_run_id)
        kind = t.kind
        if kind is _TOOL_CALL:
            calls = len(t.tool_call_ids) or 1
            cost = self._one_call if calls == 1 else self.prices.tool_cost(calls)
            n[TOOL_CALLS] += calls
            n[TOOLING_MICROS] += cost.micros
            self._call_line(rs, t, _TOOLING, calls, cost, ms, state, out)
        elif kind is _TOOL_RESULT:
            n[TOOL_RESULTS] += 1
        elif kind in _RETRIEVED:
            cost = self._one_retrieval
            n[RETRIEVALS] += 1
            n[RETRIEVAL_MICROS] += cost.micros
            if kind is _MEMORY:
                rs.note_memory(t.item_id)
            self._call_line(rs, t, _RETRIEVAL, 1, cost, ms, state, out)
        if earlier:
            self._count_decisions(rs, t.run_id, earlier)
        return self._applied(key, rs, t, ms, state, out)

    def _call_line(self, rs: RunState, t: TurnEvent, surface: str, calls: int, cost: Cost, ms: int,
                   state: BudgetStore, out: list[Output]) -> None:
        """The cost line of a turn priced per call (a tool call, a retrieval)."""
        self._line(rs, t.tenant_id, t.run_id, state, out, PendingLine(
            surface, t.event_id, t.event_id, t.user_id, t.session_id, t.agent_id, None, calls, _CALLS,
            cost.micros, cost.estimated, ms))

    def _usage(self, u: UsageReport, ms: int, pos: Position, state: BudgetStore) -> list[Output]:
        if (opened := self._open(u, USAGE, pos, state)) is None:
            return []
        key, rs = opened
        n = rs.n
        if not rs.accept_call(u.call_id):
            state.put_state(TABLE, key, rs)
            return []
        out: list[Output] = []
        rs.usage_chain = step(rs.usage_chain, usage_form(u, ms))
        n[USAGE_TOKENS] += u.input_tokens
        n[USAGE_TOKENS + 1] += u.output_tokens
        n[USAGE_TOKENS + 2] += u.cached_read_tokens
        n[USAGE_TOKENS + 3] += u.cache_write_tokens
        n[USAGE_TOKENS + 4] += u.reasoning_tokens
        n[REPORTS] += 1
        partial = usage_incomplete(u)
        if partial:
            rs.flag(INCOMPLETE)
        cost = self.prices.usage_cost(u)
        n[INFERENCE_MICROS] += cost.micros
        # A partial report's own figure is what the provider counted before the stream broke: flagged, and the
        # rest of the call is in the run's closure estimate.
        self._line(rs, u.tenant_id, u.run_id, state, out, PendingLine(
            _INFERENCE, u.event_id, u.event_id, u.user_id, u.session_id, u.agent_id, u.model, usage_tokens(u),
            _TOKENS, cost.micros, cost.estimated or partial, ms))
        return self._applied(key, rs, u, ms, state, out)

    def _run(self, r: RunEvent, ms: int, pos: Position, state: BudgetStore) -> list[Output]:
        if (opened := self._open(r, RUNS, pos, state)) is None:
            return []
        key, rs = opened
        n = rs.n
        finalized = r.phase is RunPhase.FINALIZED
        phase = FINALIZED if finalized else STARTED
        if n[FLAGS] & phase:
            state.put_state(TABLE, key, rs)
            return []
        out: list[Output] = []
        rs.runs_chain = step(rs.runs_chain, run_form(r, ms))
        rs.user_id, rs.session_id, rs.agent_id = intern_id(r.user_id), intern_id(r.session_id), intern_id(r.agent_id)
        if r.model:
            rs.model = intern_id(r.model)
            rs.flag(RUN_MODEL)
        if r.policy_version is not None:
            rs.policy_version = intern_id(r.policy_version)
        if r.prefix_hash is not None:
            rs.prefix_hash = intern_id(r.prefix_hash)
        if r.privacy is not _RETAINED:
            rs.flag(PRIVATE)
        if finalized:
            n[FINALIZED_MS] = ms
            n[STATUS] = STATUS_INDEX[EnvelopeStatus(r.status.value)]  # type: ignore[union-attr]  (set when finalized)
            n[FLAGS] = (n[FLAGS] | FINALIZED) & ~ABANDONED
        else:
            n[STARTED_MS] = ms
            rs.flag(STARTED)
        rs.parent_run_id, rs.workflow_id = intern_id(r.parent_run_id), intern_id(r.workflow_id)
        if not n[FLAGS] & LINEAGE:
            self._learn_lineage(rs, r.tenant_id, r.run_id, state, out)
        return self._applied(key, rs, r, ms, state, out)

    def _candidate(self, c: MemoryCandidate, pos: Position, state: BudgetStore) -> list[Output]:
        if (opened := self._open(c, CANDIDATES, pos, state)) is None:
            return []
        key, rs = opened
        if not rs.accept_candidate(c.candidate_id):
            state.put_state(TABLE, key, rs)
            return []
        rs.n[PROMOTIONS + _SCOPE_INDEX[c.scope]] += 1
        # A candidate is activity of its run: it delays the idle timeout, but it is not one of the run's events
        # (not hashed nor counted, and it moves no watermark).
        return self._changed(key, rs, c.tenant_id, c.run_id, to_ms(c.occurred_at), state, [])

    def _summary(self, s: Summary, pos: Position, state: BudgetStore, earlier: Sequence[Any]) -> list[Output]:
        key = run_key(s.tenant_id, s.run_id)
        rs: RunState | None = state.get_state(TABLE, key)
        if rs is None or pos.offset <= rs.n[OFFSETS + SUMMARIES]:
            return []
        rs.n[OFFSETS + SUMMARIES] = pos.offset
        if not self._count_decisions(rs, s.run_id, earlier):
            state.put_state(TABLE, key, rs)
            return []
        return self._changed(key, rs, s.tenant_id, s.run_id, -1, state, [])

    # ---- shared steps -----------------------------------------------------------------------------------------
    @staticmethod
    def _open(e: Any, stream: int, pos: Position, state: BudgetStore) -> tuple[str, RunState] | None:
        """The key and state of ``e``'s run, its offset of ``stream`` now ``pos``'s; None when the state holds the
        record already (applied before a crash: its outputs went out then)."""
        key = run_key(e.tenant_id, e.run_id)
        rs: RunState | None = state.get_state(TABLE, key)
        if rs is not None and pos.offset <= rs.n[OFFSETS + stream]:
            return None
        rs = rs or new_state(e.user_id, e.session_id, e.agent_id)
        rs.n[OFFSETS + stream] = pos.offset
        return key, rs

    def _applied(
        self, key: str, rs: RunState, e: TurnEvent | UsageReport | RunEvent, ms: int, state: BudgetStore,
        out: list[Output],
    ) -> list[Output]:
        rs.n[EVENTS] += 1
        return self._changed(key, rs, e.tenant_id, e.run_id, ms, state, out)

    def _changed(
        self, key: str, rs: RunState, tenant_id: str, run_id: str, ms: int, state: BudgetStore, out: list[Output]
    ) -> list[Output]:
        """A record changed the run: note its time, re-arm or reopen, and publish the envelope of a closed run."""
        n = rs.n
        n[CHANGES] += 1
        old = n[LAST_MS]
        latest = ms >= 0 and rs.touch(ms)
        if n[FLAGS] & ABANDONED:
            n[FLAGS] &= ~ABANDONED  # the agent was not dead: open again until it finalizes or idles out again
            n[STATUS] = _OPEN
            self._index_of(tenant_id).note(key, None, n[LAST_MS] + self.idle_ms)
        elif latest and not n[FLAGS] & FINALIZED:
            self._index_of(tenant_id).note(key, old + self.idle_ms if old >= 0 else None, n[LAST_MS] + self.idle_ms)
        if n[FLAGS] & CLOSED:
            out += self._publish(rs, tenant_id, run_id, state)
        state.put_state(TABLE, key, rs)
        return out

    def _count_decisions(self, rs: RunState, run_id: str, earlier: Sequence[Any]) -> bool:
        """Count the planner's decisions for the run among what the chain published for this record."""
        n, counted = rs.n, False
        for d in earlier:
            if type(d) is not Decision or d.run_id != run_id:
                continue
            if d.kind in _EVICTING:
                n[EVICTIONS] += len(d.actions)
            elif d.kind is DecisionKind.SWAP:
                n[COMPRESSIONS] += 1
            else:
                continue
            n[FREED] += d.tokens_freed or 0
            counted = True
        return counted

    def _line(self, rs: RunState, tenant_id: str, run_id: str, state: BudgetStore, out: list[Output],
              line: PendingLine) -> None:
        if line.estimated:
            rs.flag(GUESSED)
        if rs.n[FLAGS] & (LINEAGE | CLOSED):
            lineage = self._lineage(rs, tenant_id, run_id, state)
            out.append(publish(line, tenant_id, run_id, lineage, self.prices.version))
        else:
            rs.waiting = [*(rs.waiting or ()), line.to_list()]

    def _learn_lineage(self, rs: RunState, tenant_id: str, run_id: str, state: BudgetStore, out: list[Output]) -> None:
        rs.flag(LINEAGE)
        self._flush(rs, tenant_id, run_id, state, out)

    def _flush(self, rs: RunState, tenant_id: str, run_id: str, state: BudgetStore, out: list[Output]) -> None:
        if rs.waiting:
            lineage, version = self._lineage(rs, tenant_id, run_id, state), self.prices.version
            out += [publish(PendingLine.from_list(v), tenant_id, run_id, lineage, version) for v in rs.waiting]
            rs.waiting = None

    def _lineage(self, rs: RunState, tenant_id: str, run_id: str, state: BudgetStore) -> Lineage:
        """The run's place in its tree: from its run events (or a root turn); else, once it must be published
        without them, the parent's tree (the parent itself when that is unknown too)."""
        if rs.n[FLAGS] & LINEAGE:
            root = rs.workflow_id or run_id
            return Lineage(rs.parent_run_id, root, root)
        parent = rs.parent_run_id
        if parent is None:
            return Lineage(None, run_id, run_id)
        above: RunState | None = state.get_state(TABLE, run_key(tenant_id, parent))
        root = above.workflow_id if above is not None and above.n[FLAGS] & LINEAGE and above.workflow_id else parent
        return Lineage(parent, root, root)

    def _depth(self, rs: RunState, tenant_id: str, state: BudgetStore) -> int:
        """Hops to the root; a parent this worker holds no state of counts as the root."""
        depth, current = 0, rs
        while current.parent_run_id is not None and depth < MAX_DEPTH:
            depth += 1
            above = state.get_state(TABLE, run_key(tenant_id, current.parent_run_id))
            if above is None:
                break
            current = above
        return depth

    # ---- closing ----------------------------------------------------------------------------------------------
    def _close_idle(self, tenant_id: str, stream: int, ms: int, state: BudgetStore, out: list[Output]
                    ) -> list[Output]:
        """Close the tenant's runs whose idle deadline the watermark (with this record, at ``ms`` in ``stream``)
        has passed; returns ``out`` with what that publishes."""
        index = self._idle.get(tenant_id)  # type: ignore[union-attr]  (built by process)
        if index is None or index.empty:
            return out
        mark = state.get_watermark(tenant_key(tenant_id))
        if mark is None:
            return out
        times = [*mark.times]
        if ms > times[stream]:
            times[stream] = ms
        low = min(times)
        if low < 0:
            # A stream that has carried none of the tenant's records yet may be one the worker has not read yet
            # (a replay interleaves the streams differently): it could still bring a record of the run.
            return out
        bucket = index.bucket_ms
        # In key order: a live index files runs in arrival order, one rebuilt after a restart in store order, and
        # the closures one record publishes must come out the same either way.
        for key in sorted(index.due(low)):
            rs: RunState | None = state.get_state(TABLE, key)
            # Due when the watermark passed the end of its deadline's bucket: exactly the runs an index built
            # afresh from the store would hand over, so a restart closes a run at the same record as a live worker.
            if rs is None or rs.n[FLAGS] & CLOSED or ((rs.n[LAST_MS] + self.idle_ms) // bucket + 1) * bucket > low:
                continue  # retired, closed, or active since (filed under its later deadline too)
            rs.flag(ABANDONED)
            rs.n[STATUS] = _ABANDONED
            if not rs.n[EVENTS]:
                state.delete_state(TABLE, key)  # memory candidates of a run that never sent an event
                continue
            out += self._publish(rs, tenant_id, key.split(":", 1)[1], state)
            state.put_state(TABLE, key, rs)
        return out

    def _publish(self, rs: RunState, tenant_id: str, run_id: str, state: BudgetStore) -> list[Output]:
        """A closed run's envelope and closure lines (and the lines that waited for its lineage)."""
        n, flags, prices = rs.n, rs.n[FLAGS], self.prices
        out: list[Output] = []
        self._flush(rs, tenant_id, run_id, state, out)
        lineage = self._lineage(rs, tenant_id, run_id, state)
        finalized_ms = n[FINALIZED_MS] if flags & FINALIZED else n[LAST_MS] + self.idle_ms
        missing = not n[REPORTS] or bool(flags & INCOMPLETE)
        context = sum(n[LAYER_TOKENS:LAYER_TOKENS + len(LAYERS)])
        estimated = max(context - sum(n[USAGE_TOKENS:USAGE_TOKENS + 5]), 0) if missing else 0
        estimate = prices.estimate_cost(rs.model, estimated)
        byte_days = n[RETAINED_BYTES] * self.storage_days
        storage = prices.storage_cost(byte_days)
        source = closure_source(run_id)
        # Both closure lines at every publication, zero or not: an estimate that a late report brings to zero must
        # replace the line that said otherwise, and which lines exist must not depend on when the run was emitted.
        for surface, quantity, unit, micros, model in (
            (_INFERENCE, estimated, _TOKENS, estimate.micros, rs.model),
            (_PERSISTENCE, byte_days, _BYTE_DAYS, storage.micros, None),
        ):
            line = PendingLine(surface, source, source, rs.user_id, rs.session_id, rs.agent_id, model, quantity, unit,
                               micros, True, finalized_ms)
            out.append(publish(line, tenant_id, run_id, lineage, prices.version))
        started_ms = n[STARTED_MS] if n[STARTED_MS] >= 0 else n[FIRST_MS]
        inference = n[INFERENCE_MICROS] + estimate.micros
        layers = n[LAYER_TOKENS:LAYER_TOKENS + len(LAYERS)]
        promotions = {_SCOPES[i].value: c for i, c in enumerate(n[PROMOTIONS:PROMOTIONS + 4]) if c}
        out.append(trusted(RunEnvelope, dict(
            tenant_id=tenant_id, user_id=rs.user_id, session_id=rs.session_id, run_id=run_id,
            parent_run_id=lineage.parent_run_id, root_run_id=lineage.root_run_id, workflow_id=lineage.workflow_id,
            agent_id=rs.agent_id, depth=self._depth(rs, tenant_id, state), policy_version=rs.policy_version,
            prefix_hash=rs.prefix_hash, model=rs.model,
            privacy=PrivacyMode.NO_RETENTION if flags & PRIVATE else PrivacyMode.RETAINED,
            status=STATUSES[n[STATUS]].value,
            closed_by=(ClosedBy.AGENT if flags & FINALIZED else ClosedBy.IDLE_TIMEOUT).value,
            started_at=from_ms(started_ms) if started_ms >= 0 else None, finalized_at=from_ms(finalized_ms),
            last_event_at=from_ms(max(n[LAST_MS], 0)),
            duration_ms=max(finalized_ms - started_ms, 0) if started_ms >= 0 else None,
            global_tokens=layers[0], tenant_tokens=layers[1], user_tokens=layers[2], retrieved_tokens=layers[3],
            session_tokens=layers[4], static_prefix_tokens=n[STATIC_TOKENS],
            dynamic_tokens=context - n[STATIC_TOKENS], input_tokens=n[USAGE_TOKENS],
            output_tokens=n[USAGE_TOKENS + 1], cached_read_tokens=n[USAGE_TOKENS + 2],
            cache_write_tokens=n[USAGE_TOKENS + 3], reasoning_tokens=n[USAGE_TOKENS + 4], usage_estimated=missing,
            retrievals=n[RETRIEVALS], memory_ids=list(rs.memory_ids or ()), tool_calls=n[TOOL_CALLS],
            tool_results=n[TOOL_RESULTS], promotions=promotions, evictions=n[EVICTIONS],
            compressions=n[COMPRESSIONS], tokens_freed=n[FREED],
            cost_micros=inference + n[RETRIEVAL_MICROS] + n[TOOLING_MICROS] + storage.micros,
            inference_micros=inference, retrieval_micros=n[RETRIEVAL_MICROS], tooling_micros=n[TOOLING_MICROS],
            persistence_micros=storage.micros,
            cost_estimated=bool(flags & GUESSED) or estimated > 0 or byte_days > 0, price_version=prices.version,
            event_count=n[EVENTS],
            integrity_hash=combine(tenant_id, run_id, rs.turn_chain(), rs.usage_chain, rs.runs_chain),
            envelope_version=2 * n[CHANGES] + 1, updated_at=from_ms(max(n[LAST_MS], finalized_ms)),
            estimated_tokens=estimated, usage_reports=n[REPORTS],
        )))
        return out

    # ---- the deadline index -----------------------------------------------------------------------------------
    def _build_index(self, state: BudgetStore) -> None:
        self._idle = {}
        for key, _ in state.run_items():
            rs: RunState | None = state.get_state(TABLE, key)
            if rs is not None and not rs.n[FLAGS] & CLOSED and rs.n[LAST_MS] >= 0:
                self._index_of(tenant_of_key(key)).note(key, None, rs.n[LAST_MS] + self.idle_ms)

    def _index_of(self, tenant_id: str) -> RetirementIndex:
        assert self._idle is not None
        index = self._idle.get(tenant_id)
        if index is None:
            index = self._idle[tenant_id] = RetirementIndex(max(self.idle_ms // 16, 1))
        return index
