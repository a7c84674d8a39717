"""The eviction planner: what leaves a run's context, what is masked, compressed, offloaded and recalled.

A processor of the chain (:mod:`processors.chain`), after the budget. Per turn it files the item in the run's
:class:`~processors.eviction.workset.WorkingSet` (tier, importance, pairing, identifiers), notes references
(a turn naming an earlier item's identifiers), recalls offloaded items a turn names, and when a slot crosses
its soft watermark frees tokens down to the tier's eviction target (``evict_to`` of the cap). At ``compress_at``
(80%) of a slot it requests a summary of the slot's oldest ~30% from the summarizer workers (a
:class:`~schemas.models.CompressionJob`: off the hot path); a prepared :class:`~schemas.models.Summary` is
swapped in when the slot reaches ``swap_at`` (95%), or earlier when relief needs it. A compression that would
free less than ``min_gain`` of its slot backs off until the slot has grown by that much, instead of repeating.

Strategies (the manifest's ``eviction.strategy``; ``ctxflow simulate --strategy``) differ only in what they
pick and what they do with it:

======================  =====================================================================================
strategy                relief
======================  =====================================================================================
sliding_window          evict the oldest
lru                     evict the least recently referenced
importance              evict the least important
relevance               evict the least relevant to the current query (embedding sketch, else identifiers)
observation_masking     mask the oldest tool results (a placeholder names what was there), then evict oldest
summarization           swap a prepared summary of the oldest items in, then evict the oldest
retrieval_augmented     offload the lowest-scored (session memory), recall them when a later turn names them
hybrid                  tier 3 evicted, tier 2 offloaded, tier 1 summarized, then offloaded; recalls
======================  =====================================================================================

Invariants every strategy keeps (property-tested): tier 0 and the current user turn are never touched; a tool
call and its results leave or stay together (a group; masking keeps the call and a placeholder of the result);
the newest ``keep_recent`` items stay; a decision never names an item the ledger does not hold, and a summary is
swapped in only while every source is live; summaries of summaries stop at depth 2.

Deletions reach the planner as :class:`~schemas.models.Invalidation` records (topic ``invalidations``, the memory
processor's own output read back: :mod:`processors.memory.cascade`). One of ``target_type`` ``summary`` for a run
whose working set the planner holds takes the summary's text out of the table: a prepared summary with that id is
dropped (the run asks for a new compression when its budget needs one), and one already swapped in leaves the
working set by an ``evict`` decision naming it, whose freed tokens bring the budget's gauges back down (the
agent's window dropped it on the memory processor's stale-context notice). Other invalidations change nothing here.

Each relief reports its expected cost effect on the next call: the items after the first one changed lose the
provider's prompt cache (written again at the cache-write price instead of read at the cached price), against
the tokens no longer read. The planner keeps the prefix when it can: relief runs only past the soft watermark
and goes down to the target in one decision, so the context stays append-only between reliefs.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from ctxflow.processors.budget import BudgetProcessor, Relief
from ctxflow.processors.chain import TableSpec
from ctxflow.processors.eviction.features import term_hash, turn_features, unpack_terms
from ctxflow.processors.eviction.policy import KIND_INDEX, KINDS, ROLE_INDEX, ROLES, importance_of, tier_of
from ctxflow.processors.eviction.workset import (
    CONSTRAINT,
    GOAL,
    IN_JOB,
    INVALIDATIONS,
    ITEM,
    ITEM_STRUCT,
    MASKED,
    MAX_DEPTH,
    MAX_SHORT_TERMS,
    OFFLOADED,
    ORDER_SHIFT,
    PINNED,
    RECALLED,
    SUMMARIES,
    SUMMARY,
    TERM_MASK,
    TERMS,
    TURNS,
    PreparedSummary,
    WorkingSet,
    short_terms,
)
from ctxflow.processors.ledger import INVALIDATIONS as INVALIDATIONS_STREAM
from ctxflow.processors.ledger import SUMMARIES as SUMMARIES_STREAM
from ctxflow.processors.ledger import TURNS as TURNS_STREAM
from ctxflow.processors.manifest import SLOT_INDEX, SLOTS, EffectiveBudget, Limit
from ctxflow.processors.memory.cascade import SUMMARY as SUMMARY_TARGET
from ctxflow.processors.pricing import DEFAULT_PRICES, PriceTable
from ctxflow.processors.types import BudgetStore, Position, decision_id, run_key, tenant_key
from ctxflow.processors.windows import to_ms
from ctxflow.schemas.models import (
    CompressionJob,
    CompressionSource,
    ContentFeatures,
    Decision,
    DecisionKind,
    EvictionPolicy,
    EvictionStrategy,
    Invalidation,
    InvalidationKind,
    ItemAction,
    ItemDecision,
    ItemKind,
    OverflowBehaviour,
    PrivacyMode,
    Role,
    Summary,
    SummaryProvenance,
    TurnEvent,
    content_digest,
)

PLANNER_VERSION = "1"
#: The planner's table: one working set per run.
TABLE = "worksets"
DEFAULT_POLICY = EvictionPolicy()
#: What an extractive summary is expected to keep of its sources, for judging a compression worth asking for.
EXPECTED_RATIO = 0.3
#: A summary may take up to this share of its sources' tokens when its facts need the room (the summarizer aims
#: at EXPECTED_RATIO and grows only to keep identifiers and numbers).
SUMMARY_ROOM = 0.5
#: A summary that keeps less than this share of its sources' identifiers and numbers is not swapped in: their
#: items are offloaded instead, where a later turn naming a lost identifier recalls them.
MIN_FIDELITY = 0.9
#: Event time a compression job may stay unanswered (its summarizer refused it, or lags far behind) before it is
#: given up and its items are no longer held for it.
JOB_PATIENCE_MS = 300_000

_S = EvictionStrategy
_RECALLS = frozenset((_S.HYBRID, _S.RETRIEVAL_AUGMENTED))
_COMPRESSES = frozenset((_S.HYBRID, _S.SUMMARIZATION))
_USER_MESSAGE = KIND_INDEX[ItemKind.MESSAGE] | ROLE_INDEX[Role.USER] << 4
_TOOL_RESULT = KIND_INDEX[ItemKind.TOOL_RESULT]
_TOOL_CALL = KIND_INDEX[ItemKind.TOOL_CALL]
_ASSISTANT = ROLE_INDEX[Role.ASSISTANT]
_ACTION_OF = {
    DecisionKind.EVICT: ItemAction.EVICT,
    DecisionKind.OFFLOAD: ItemAction.OFFLOAD,
    DecisionKind.MASK: ItemAction.MASK,
    DecisionKind.SWAP: ItemAction.SWAP,
    DecisionKind.RECALL: ItemAction.RECALL,
    DecisionKind.COMPRESS: ItemAction.COMPRESS,
}

Output = Decision | CompressionJob | Relief

#: The decision kinds the planner emits: one per eviction action.
EVICTION_KINDS = frozenset(_ACTION_OF)


def pending_jobs(worksets: Iterable[WorkingSet]) -> int:
    """How many of ``worksets`` wait on a compression job: asked for, neither answered by a summary nor given up."""
    return sum(1 for ws in worksets if ws.job_id is not None)


@dataclass(slots=True)
class _Plan:
    """One relief's choices: (decision kind, uids) steps in order, and the tokens they free."""

    steps: list[tuple[DecisionKind, list[int]]]
    freed: int = 0


def sketch(embedding: Sequence[float]) -> int:
    """A 64-bit sign sketch of an embedding (random hyperplanes, fixed per dimension): the Hamming distance
    of two sketches estimates the angle between the vectors (Charikar), so relevance needs no stored vector."""
    planes = _planes(len(embedding))
    bits = (planes @ np.asarray(embedding, dtype=np.float32)) >= 0
    return int(np.packbits(bits.astype(np.uint8), bitorder="little").view("<u8")[0])


_PLANES: dict[int, np.ndarray] = {}


def _planes(dim: int) -> np.ndarray:
    planes = _PLANES.get(dim)
    if planes is None:
        planes = _PLANES[dim] = np.random.default_rng(dim).standard_normal((64, dim)).astype(np.float32)
    return planes


def mask_placeholder(item_id: str, tokens: int, kind: str = "tool result") -> str:
    """The short text a masked item leaves behind: what was there (the planner keeps no text to quote)."""
    return f"[{kind} {item_id} masked: {tokens} tokens]"


class EvictionPlanner:
    """Plans relief for runs under context pressure; ``strategy`` overrides every manifest's (simulation)."""

    name = "eviction"
    tables = (TableSpec(TABLE, WorkingSet.to_bytes, WorkingSet.from_bytes),)

    def __init__(
        self, budget: BudgetProcessor, prices: PriceTable = DEFAULT_PRICES, strategy: EvictionStrategy | None = None
    ) -> None:
        self.budget = budget
        self.prices = prices
        self.strategy = strategy

    # ---- the processor interface ------------------------------------------------------------------------------
    def process(
        self, event: object, pos: Position, state: BudgetStore, now: datetime, earlier: Sequence[object] = ()
    ) -> list[Output]:
        """Apply one record; returns its decisions, compression jobs and the run's relief for the budget."""
        if isinstance(event, TurnEvent):
            return self._turn(event, pos, state, now)
        if isinstance(event, Summary):
            return self._summary(event, pos, state, now)
        if isinstance(event, Invalidation):
            return self._invalidation(event, pos, state, now)
        return []

    def retire(self, keys: Iterable[str], state: BudgetStore) -> None:
        """Forget the working sets of runs the budget retired."""
        for key in keys:
            state.delete_state(TABLE, key)

    def forget_index(self) -> None:
        """Nothing to forget: the planner keeps no index beside its table."""

    def policy(self, state: BudgetStore, tenant_id: str) -> EvictionPolicy:
        """The tenant's eviction policy (the manifest's, else the defaults)."""
        manifest = state.get_manifest(tenant_key(tenant_id))
        return manifest.eviction if manifest is not None and manifest.eviction is not None else DEFAULT_POLICY

    # ---- turns ------------------------------------------------------------------------------------------------
    def _turn(self, t: TurnEvent, pos: Position, state: BudgetStore, now: datetime) -> list[Output]:
        key = run_key(t.tenant_id, t.run_id)
        ws: WorkingSet | None = state.get_state(TABLE, key)
        if ws is not None and pos.offset <= ws.offsets[TURNS]:
            # Applied before a crash: the budget may have missed the relief (its run ledger was not yet durable).
            return [Relief(t, t.event_id, TURNS_STREAM, pos.offset, tuple(ws.freed))]
        ws = ws or WorkingSet()
        ws.offsets[TURNS] = pos.offset
        if not ws.accept_seq(t.seq):
            state.put_state(TABLE, key, ws)
            return [Relief(t, t.event_id, TURNS_STREAM, pos.offset, tuple(ws.freed))]
        if t.privacy is PrivacyMode.NO_RETENTION:
            ws.private = True
        features = turn_features(t)
        at = ws.next_uid  # the turn's arrival number: references and recency count in arrivals, not clock time
        mentioned = self._file(ws, t, pos, features, at, self.budget.turn_tokens(t, pos, state))
        budget = self.budget.budget(state, t.tenant_id, t.user_id)
        policy = self.policy(state, t.tenant_id)
        strategy = self.strategy or policy.strategy
        out: list[Output] = []
        plans = budget.overflow is OverflowBehaviour.EVICT_AND_COMPRESS
        if plans and not self._quiet(ws, t, budget, policy, mentioned):
            em = _Emitter(t, t.event_id, budget, strategy, now, self.prices, t.model)
            if strategy in _RECALLS and mentioned:
                self._recall(ws, mentioned, at, em)
            if t.kind is ItemKind.TOOL_RESULT:
                self._rejoin(ws, em)
            # 80% (a summary is asked for), then the soft watermark (relief), then 95% (a prepared summary goes in).
            if strategy in _COMPRESSES and not ws.private:
                job = self._request_compression(ws, t, budget, policy, em)
                if job is not None:
                    out.append(job)
            self._relieve(ws, budget, policy, strategy, em)
            self._swap_if_due(ws, budget, policy, em, force=False, now_ms=to_ms(t.occurred_at))
            self._bound_memory(ws, em)
            out += em.out
        state.put_state(TABLE, key, ws)
        out.append(Relief(t, t.event_id, TURNS_STREAM, pos.offset, tuple(ws.freed)))
        return out

    @staticmethod
    def _quiet(ws: WorkingSet, t: TurnEvent, budget: EffectiveBudget, policy: EvictionPolicy,
               mentioned: set[int]) -> bool:
        """Nothing to plan: every slot below where compression or relief start, nothing offloaded that the turn
        could recall, and no result that could answer an offloaded call (the common case, kept cheap)."""
        if (mentioned or t.kind is ItemKind.TOOL_RESULT) and ws.offloaded:
            return False
        for i, limit in enumerate(budget.slot_limits):
            if limit is not None and ws.added[i] - ws.freed[i] >= min(limit.soft_at, policy.compress_at * limit.cap):
                return False
        return ws.live_tokens() < budget.total.soft_at

    def _file(
        self, ws: WorkingSet, t: TurnEvent, pos: Position, features: ContentFeatures | None, at: int, tokens: int
    ) -> set[int]:
        """Insert the turn's item; note which live items it references. Returns the hashes of the identifiers and
        numbers it names (what may recall offloaded items)."""
        # The view is built only for what needs it: most turns are neither user messages nor tool results.
        view = ws.view() if len(ws) else None
        first_user = (t.role is Role.USER and t.kind is ItemKind.MESSAGE
                      and (view is None or not bool((view["kind"] == _USER_MESSAGE).any())))
        digest = bytes.fromhex(t.content_digest or content_digest(t.content or ""))
        repeats = t.kind is ItemKind.TOOL_RESULT and view is not None and bool((view["digest"] == digest).any())
        pair = ws.call_of(term_hash(t.tool_call_id)) if t.kind is ItemKind.TOOL_RESULT and t.tool_call_id else -1
        # Hashed once, in features.ranked_terms' order: when an item holds more than the ledger keeps, its names
        # outrank its values.
        hashed = unpack_terms(features) if features is not None else []
        named = set(hashed)
        if named and view is not None:
            rows = view["terms"].tolist()
            counts: dict[int, int] = {}
            for row in rows:
                for h in named.intersection(row):
                    counts[h] = counts.get(h, 0) + 1
            # A term more items carry names none of them in particular (a tool's name, a common path).
            mentioned = {h for h, c in counts.items() if c <= _MAX_TERM_ITEMS}
            if mentioned:
                hits = np.fromiter((not mentioned.isdisjoint(row) for row in rows), dtype=bool, count=len(rows))
                if hits.any():
                    view["refs"][hits] = np.minimum(view["refs"][hits].astype(np.int32) + 1, 0xFFFF)
                    view["ref"][hits] = at
        del view
        uid = ws.next_uid
        ws.next_uid += 1
        tier = tier_of(t, first_user, repeats)
        flags = PINNED if t.tier_hint == 0 else 0
        if features is not None:
            flags |= (GOAL if features.goal else 0) | (CONSTRAINT if features.constraint else 0)
        if t.kind is ItemKind.SUMMARY:
            flags |= SUMMARY
        slot = SLOT_INDEX[t.slot]
        item_sketch = sketch(t.embedding) if t.embedding else 0
        top = (hashed[:TERMS] + [0] * TERMS)[:TERMS]
        record = ITEM_STRUCT.pack(
            t.seq << ORDER_SHIFT, uid, tokens, uid, 0, tier, slot, KIND_INDEX[t.kind] | ROLE_INDEX[t.role] << 4,
            flags, 1 if t.kind is ItemKind.SUMMARY else 0, round(255 * importance_of(t, features)), pair,
            *top, digest, pos.offset,
        )
        ws.partition = pos.partition
        ws.insert(record, t.item_id, short_terms(hashed[:MAX_SHORT_TERMS]))
        if item_sketch:
            ws.sketches += struct.pack("<IQ", uid, item_sketch)
        ws.added[slot] += tokens
        issued = t.tool_call_ids or ([t.tool_call_id] if t.kind is ItemKind.TOOL_CALL and t.tool_call_id else [])
        if issued:
            ws.add_call_ids(uid, [term_hash(c) for c in issued])
        if t.role is Role.USER and t.kind is ItemKind.MESSAGE:
            ws.query_terms = np.asarray(hashed[:16], dtype="<u4").tobytes()
            ws.query_sketch = item_sketch
        return named

    # ---- relief -------------------------------------------------------------------------------------------------
    def _relieve(
        self, ws: WorkingSet, budget: EffectiveBudget, policy: EvictionPolicy, strategy: EvictionStrategy,
        em: _Emitter,
    ) -> None:
        """Bring every slot past its soft watermark, then the total, down to the tier's eviction target."""
        scopes: list[tuple[int | None, Limit]] = [
            (i, limit) for i, limit in enumerate(budget.slot_limits) if limit is not None
        ]
        scopes.append((None, budget.total))
        for slot, limit in scopes:
            live = ws.live_tokens(slot)
            if live < limit.soft_at:
                continue
            need = live - budget.evict_target(limit)
            freed = 0
            for kind, uids in self._plan(ws, slot, need, policy, strategy):
                freed += self._apply(ws, kind, uids, slot, limit, em, why=f"relief to {budget.evict_target(limit)}")
                if freed >= need:
                    break
            if freed < need and ws.job_id is not None and ws.prepared is None and ws.job_slot in (slot, None):
                # Relief needs the items a pending summary holds: stop waiting for it and take them.
                job_limit = budget.slot_limits[ws.job_slot]
                if job_limit is not None:
                    self._give_up(ws, job_limit)
                    for kind, uids in self._plan(ws, slot, need - freed, policy, strategy):
                        freed += self._apply(ws, kind, uids, slot, limit, em,
                                             why=f"relief to {budget.evict_target(limit)}")
                        if freed >= need:
                            break
            if ws.live_tokens(slot) >= limit.cap and policy.keep_recent:
                # Still over the cap: the newest items lose their shelter (never tier 0, the current user turn,
                # an open call or what this turn named); an agent cannot send more than its budget.
                over = ws.live_tokens(slot) - budget.evict_target(limit)
                bare = policy.model_copy(update={"keep_recent": 0})
                freed = 0
                for kind, uids in self._plan(ws, slot, over, bare, strategy):
                    freed += self._apply(ws, kind, uids, slot, limit, em, why=f"over the cap {limit.cap}")
                    if freed >= over:
                        break

    def _plan(
        self, ws: WorkingSet, slot: int | None, need: int, policy: EvictionPolicy, strategy: EvictionStrategy
    ) -> Iterable[tuple[DecisionKind, list[int]]]:
        """Steps that free at least ``need`` tokens of ``slot`` (None: every slot) if the strategy can."""
        S = EvictionStrategy
        if strategy in (S.SLIDING_WINDOW, S.LRU, S.IMPORTANCE, S.RELEVANCE):
            key = {S.SLIDING_WINDOW: "oldest", S.LRU: "lru", S.IMPORTANCE: "importance", S.RELEVANCE: "relevance"}
            yield from self._groups(ws, slot, need, policy, DecisionKind.EVICT, key[strategy])
        elif strategy is S.OBSERVATION_MASKING:
            need = yield from self._masks(ws, slot, need, policy)
            yield from self._groups(ws, slot, need, policy, DecisionKind.EVICT, "oldest")
        elif strategy is S.SUMMARIZATION:
            need = yield from self._swap_step(ws, slot, need)
            yield from self._groups(ws, slot, need, policy, DecisionKind.EVICT, "oldest")
        elif strategy is S.RETRIEVAL_AUGMENTED:
            yield from self._groups(ws, slot, need, policy, DecisionKind.OFFLOAD, "score")
        else:  # hybrid: tier 3 -> 2 -> 1, never 0
            need = yield from self._groups(ws, slot, need, policy, DecisionKind.EVICT, "score", tiers=(3,))
            need = yield from self._groups(ws, slot, need, policy, DecisionKind.OFFLOAD, "score", tiers=(2,))
            need = yield from self._swap_step(ws, slot, need)
            # Not masking: a masked result keeps its place but loses what a later turn may name, while an
            # offloaded one comes back when named.
            yield from self._groups(ws, slot, need, policy, DecisionKind.OFFLOAD, "score", tiers=(1, 2, 3),
                                    in_jobs=True)

    def _candidates(self, ws: WorkingSet, policy: EvictionPolicy, in_jobs: bool) -> tuple[np.ndarray, np.ndarray]:
        """(live, movable) masks over the items: movable excludes tier 0, pinned, the current user turn, the
        newest ``keep_recent`` items, and (unless ``in_jobs``) items a pending compression covers."""
        view = ws.view()
        n = len(view)
        flags = view["flags"]
        live = (flags & OFFLOADED) == 0
        fixed = (view["tier"] == 0) | ((flags & PINNED) != 0)
        if not in_jobs:
            fixed |= (flags & IN_JOB) != 0
        if policy.keep_recent:  # the newest to arrive (recalled items sit at the tail without being new)
            fixed[np.argsort(view["uid"])[max(n - policy.keep_recent, 0):]] = True
        # An open tool call (nothing but its results arrived since) waits for the rest of its results.
        turns = np.argsort(np.where((flags & SUMMARY) != 0, -1, view["uid"].astype(np.int64)))[::-1]
        last = next((int(i) for i in turns if (view["kind"][i] & 15) != _TOOL_RESULT), None)
        if last is not None and (view["kind"][last] & 15) == _TOOL_CALL:
            fixed[last] = True
            fixed |= view["pair"] == view["uid"][last]
        users = np.flatnonzero(view["kind"] == _USER_MESSAGE)
        if len(users):  # the current user turn: the latest to arrive (a recalled one may sit after it)
            fixed[users[np.argmax(view["uid"][users])]] = True
        # Referenced or recalled since the model last answered: the call being prepared needs it (and taking it
        # out again before that call would thrash).
        answers = view["uid"][((view["kind"] >> 4) == _ASSISTANT) & ((flags & SUMMARY) == 0)]
        since = int(answers.max()) + 1 if len(answers) else 0
        fixed |= (view["ref"] >= since) & (view["refs"] > 0)
        return live, ~fixed

    def _groups(
        self, ws: WorkingSet, slot: int | None, need: int, policy: EvictionPolicy, kind: DecisionKind, key: str,
        tiers: tuple[int, ...] | None = None, in_jobs: bool = False,
    ):  # -> Generator[tuple[DecisionKind, list[int]], None, int]
        """Tool groups (a call with its results, or one item) in the order ``key`` ranks them, whole, until
        ``need`` tokens of ``slot`` are chosen; yields one step; returns what is still needed."""
        if need <= 0:
            return need
        live, movable = self._candidates(ws, policy, in_jobs)
        view = ws.view()
        uids = view["uid"].tolist()
        group = np.where(view["pair"] >= 0, view["pair"], view["uid"]).tolist()
        members: dict[int, list[int]] = {}
        for index, g in enumerate(group):
            members.setdefault(g, []).append(index)
        rank = self._ranker(ws, view, key)
        chosen: list[int] = []
        ranked: list[tuple[float, int, int]] = []
        live_l, movable_l, tier_l = live.tolist(), movable.tolist(), view["tier"].tolist()
        slot_l, tokens_l = view["slot"].tolist(), view["tokens"].tolist()
        for g, idx in members.items():
            if not all(movable_l[i] and live_l[i] for i in idx):
                continue
            if tiers is not None and min(tier_l[i] for i in idx) not in tiers:
                continue
            gain = sum(tokens_l[i] for i in idx if slot is None or slot_l[i] == slot)
            if gain <= 0:
                continue
            ranked.append((max(rank[i] for i in idx), min(idx), g))
        ranked.sort()
        for _, _, g in ranked:
            if need <= 0:
                break
            idx = members[g]
            chosen += [uids[i] for i in idx]
            need -= sum(tokens_l[i] for i in idx if slot is None or slot_l[i] == slot)
        del view
        if chosen:
            yield kind, chosen
        return need

    def _ranker(self, ws: WorkingSet, view: np.ndarray, key: str) -> list[float]:
        """Per item, lower leaves first."""
        n = len(view)
        position = np.arange(n, dtype=np.float64) / max(n - 1, 1)
        if key == "oldest":
            return position.tolist()
        if key == "lru":
            return (view["ref"].astype(np.float64) + position * 1e-3).tolist()
        importance = view["importance"].astype(np.float64) / 255
        if key == "importance":
            return (importance + position * 1e-3).tolist()
        relevance = self._relevance(ws, view)
        if key == "relevance":
            return (relevance + position * 1e-3).tolist()
        refs = np.minimum(view["refs"].astype(np.float64), 4) / 4
        recency = view["ref"].astype(np.float64)
        span = recency.max() - recency.min() if n else 0
        recency = (recency - recency.min()) / span if span else position
        # Cache: changing an item invalidates the provider's prompt cache from it on, so among otherwise equal
        # items the planner takes later ones and keeps the cached prefix.
        cached = 1.0 - position
        return (0.4 * importance + 0.25 * recency + 0.15 * refs + 0.1 * relevance + 0.1 * cached).tolist()

    @staticmethod
    def _relevance(ws: WorkingSet, view: np.ndarray) -> np.ndarray:
        """Relevance to the current query in [0, 1]: cosine from the embedding sketches when both have one,
        else the share of the item's identifiers the query names; 0.5 when nothing can tell."""
        n = len(view)
        out = np.full(n, 0.5)
        if ws.query_sketch and ws.sketches:
            known = ws.sketch_of()
            sketches = np.fromiter((known.get(u, 0) for u in view["uid"].tolist()), dtype=np.uint64, count=n)
            has = sketches != 0
            if has.any():
                x = np.bitwise_xor(sketches[has], np.uint64(ws.query_sketch))
                distance = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
                out[has] = (np.cos(np.pi * distance / 64) + 1) / 2
                return out
        if ws.query_terms:
            terms = view["terms"]
            counted = (terms != 0).sum(axis=1)
            hits = np.isin(terms, np.frombuffer(ws.query_terms, dtype="<u4")).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                out = np.where(counted > 0, hits / np.maximum(counted, 1), 0.25)
        return out

    def _masks(self, ws: WorkingSet, slot: int | None, need: int, policy: EvictionPolicy):
        """Mask the oldest movable tool results (not goals or constraints) until ``need``; returns the rest."""
        if need <= 0:
            return need
        live, movable = self._candidates(ws, policy, in_jobs=False)
        view = ws.view()
        flags = view["flags"]
        ok = live & movable & ((view["kind"] & 15) == _TOOL_RESULT) & ((flags & (MASKED | GOAL | CONSTRAINT)) == 0)
        if slot is not None:
            ok &= view["slot"] == slot
        chosen: list[int] = []
        for i in np.flatnonzero(ok).tolist():
            if need <= 0:
                break
            gain = int(view["tokens"][i]) - _PLACEHOLDER_TOKENS
            if gain > _PLACEHOLDER_TOKENS:
                chosen.append(int(view["uid"][i]))
                need -= gain
        del view
        for uid in chosen:  # one decision each: each carries its own placeholder
            yield DecisionKind.MASK, [uid]
        return need

    def _swap_step(self, ws: WorkingSet, slot: int | None, need: int):
        """Swap the prepared summary in when it is for this slot and every source is still live."""
        p = ws.prepared
        if need <= 0 or p is None or (slot is not None and p.slot != slot) or not self._sources_live(ws, p):
            return need
        view = ws.view()
        gain = int(view["tokens"][np.isin(view["uid"], p.source_uids)].sum()) - p.tokens
        del view
        yield DecisionKind.SWAP, list(p.source_uids)
        return need - gain

    @staticmethod
    def _sources_live(ws: WorkingSet, p: PreparedSummary) -> bool:
        view = ws.view()
        present = view[np.isin(view["uid"], p.source_uids)]
        return len(present) == len(p.source_uids) and not bool((present["flags"] & (OFFLOADED | MASKED)).any())

    # ---- applying a step ----------------------------------------------------------------------------------------
    def _apply(
        self, ws: WorkingSet, kind: DecisionKind, uids: list[int], slot: int | None, limit: Limit | None,
        em: _Emitter, why: str,
    ) -> int:
        """Apply one step to the ledger and emit its decision; returns the tokens it freed in ``slot``."""
        view = ws.view()
        ids = ws.item_ids()
        hit = np.isin(view["uid"], uids)
        index = np.flatnonzero(hit)
        first = int(index[0]) if len(index) else len(view)
        # Offloaded items hold no live tokens: taking them out of session memory frees nothing more.
        before = np.where((view["flags"] & OFFLOADED) == 0, view["tokens"], 0)
        slots = view["slot"].copy()
        affected = [(ids[i], int(view["tokens"][i]), int(view["slot"][i])) for i in index.tolist()]
        live_after_first = int(view["tokens"][first:][((view["flags"][first:] & OFFLOADED) == 0) & ~hit[first:]].sum())
        summary: SummaryProvenance | None = None
        job_id: str | None = None
        if kind is DecisionKind.EVICT:
            gone = set(uids)
            del view
            ws.keep(~hit)
            ws.forget_calls(gone)
            if ws.prepared is not None and gone & set(ws.prepared.source_uids):
                ws.prepared = None  # its sources are gone: swapping it in would leave a summary of nothing
        elif kind is DecisionKind.OFFLOAD:
            view["flags"][hit] |= OFFLOADED
            del view
        elif kind is DecisionKind.MASK:
            view["tokens"][hit] = _PLACEHOLDER_TOKENS
            view["flags"][hit] |= MASKED
            i = int(index[0])
            text = mask_placeholder(ids[i], int(before[i]), KINDS[int(view["kind"][i]) & 15].value.replace("_", " "))
            summary = SummaryProvenance(
                summary_id=f"mask:{ids[i]}", text=text, token_count=_PLACEHOLDER_TOKENS, source_ids=[ids[i]],
                source_digests=[view["digest"][i:i + 1].tobytes().hex()], summarizer="mask", summarizer_version="1",
                depth=1, fidelity=0.0 if view["terms"][i].any() else 1.0,
            )
            del view
        elif kind is DecisionKind.SWAP:
            p = ws.prepared
            assert p is not None
            del view
            swapped = (p.slot, p.tokens)
            job_id, summary = p.job_id, SummaryProvenance(
                summary_id=p.summary_id, text=None if ws.private else p.text, token_count=p.tokens,
                source_ids=p.source_ids, source_digests=p.source_digests, summarizer=p.summarizer,
                summarizer_version=p.version, depth=p.depth, fidelity=p.fidelity,
            )
            self._swap_in(ws, p, hit)
        else:
            del view
        # Tokens freed per slot: what the affected items held, minus what they (or their summary) hold now.
        freed_by_slot = [0] * len(SLOTS)
        for s_, tok in zip(slots[hit].tolist(), before[hit].tolist(), strict=True):
            freed_by_slot[s_] += tok
        if kind is DecisionKind.MASK:
            for s_ in slots[hit].tolist():
                freed_by_slot[s_] -= _PLACEHOLDER_TOKENS
        elif kind is DecisionKind.SWAP:
            freed_by_slot[swapped[0]] -= swapped[1]
        for s_, tok in enumerate(freed_by_slot):
            ws.freed[s_] += tok
        freed = sum(freed_by_slot) if slot is None else freed_by_slot[slot]
        if kind is DecisionKind.SWAP and summary is not None:
            why = f"{why}; summary {summary.summary_id} of {len(uids)} items, fidelity {summary.fidelity:.2f}"
        em.step(kind, uids[0], affected, slot, sum(freed_by_slot), limit, ws, why, live_after_first,
                summary=summary, job_id=job_id)
        return freed

    def _swap_in(self, ws: WorkingSet, p: PreparedSummary, hit: np.ndarray) -> None:
        view = ws.view()
        sources = view[hit]
        order = int(sources["order"].min())
        terms = [int(x) for x in dict.fromkeys(sources["terms"].ravel().tolist()) if x][:TERMS]
        importance = int(sources["importance"].max())
        flags = SUMMARY | (int(np.bitwise_or.reduce(sources["flags"])) & (GOAL | CONSTRAINT))
        recall = short_terms(
            (h for terms in ws.recall_terms(np.flatnonzero(hit).tolist()) for h in terms), limit=4 * MAX_SHORT_TERMS,
        )
        del view, sources
        gone = set(p.source_uids)
        ws.keep(~hit)
        ws.forget_calls(gone)
        record = np.zeros(1, dtype=ITEM)
        r = record[0]
        r["order"], r["uid"], r["tokens"], r["ref"] = order, ws.next_uid, p.tokens, ws.next_uid
        ws.next_uid += 1
        r["tier"], r["slot"], r["flags"], r["depth"] = 1, p.slot, flags, p.depth
        r["kind"] = KIND_INDEX[ItemKind.SUMMARY] | ROLE_INDEX[Role.ASSISTANT] << 4
        r["importance"], r["pair"] = importance, -1
        r["terms"][: len(terms)] = terms
        r["digest"] = bytes.fromhex(content_digest(p.text))
        r["offset"] = p.offset
        del r
        ws.insert(record, p.summary_id, recall)
        ws.prepared = None
        ws.compressions += 1

    # ---- recall -------------------------------------------------------------------------------------------------
    def _bound_memory(self, ws: WorkingSet, em: _Emitter) -> None:
        """Keep a run's session memory to :data:`MAX_OFFLOADED` items: the least recently named go for good
        (with their tool groups), so neither the ledger nor recall grows without bound in a long run."""
        view = ws.view()
        offloaded = np.flatnonzero((view["flags"] & OFFLOADED) != 0)
        if len(offloaded) <= MAX_OFFLOADED:
            return
        group = np.where(view["pair"] >= 0, view["pair"], view["uid"])
        oldest = offloaded[np.argsort(view["ref"][offloaded], kind="stable")][: len(offloaded) - MAX_OFFLOADED]
        gone = np.isin(group, group[oldest]) & ((view["flags"] & OFFLOADED) != 0)
        uids = view["uid"][gone].tolist()
        del view
        self._apply(ws, DecisionKind.EVICT, uids, None, None, em, why=f"session memory holds {MAX_OFFLOADED} items")

    def _rejoin(self, ws: WorkingSet, em: _Emitter) -> None:
        """A result that answers an offloaded call joins it in memory: a result without its call is invalid, and
        recalling the call would put it after its result. (An open call is never offloaded, see
        :meth:`_candidates`; this is a late result for an old call.)"""
        view = ws.view()
        newest = int(np.argmax(view["uid"]))
        pair, uid = int(view["pair"][newest]), int(view["uid"][newest])
        offloaded_call = bool(((view["uid"] == pair) & ((view["flags"] & OFFLOADED) != 0)).any()) if pair >= 0 else 0
        del view
        if offloaded_call:
            self._apply(ws, DecisionKind.OFFLOAD, [uid], None, None, em, why="its call is offloaded")

    def _recall(self, ws: WorkingSet, mentioned: set[int], at: int, em: _Emitter) -> None:
        """Bring back offloaded items the turn names (to the context's tail: the prefix stays cacheable).

        An offloaded item answers to every identifier and number it held (24-bit hashes); a term more than
        :data:`_MAX_TERM_ITEMS` offloaded items hold names none of them in particular (a tool's name). At most
        :data:`_MAX_RECALLED` items come back per turn (with their tool partners), those naming the most first.
        """
        view = ws.view()
        offloaded = np.flatnonzero((view["flags"] & OFFLOADED) != 0)
        if not len(offloaded):
            return
        held = ws.terms_held(offloaded.tolist(), {h & TERM_MASK for h in mentioned})
        counts: dict[int, int] = {}
        for found in held:
            for h in found:
                counts[h] = counts.get(h, 0) + 1
        common = {h for h, c in counts.items() if c > _MAX_TERM_ITEMS}
        # The items that hold the most of what the turn names, oldest first (the original, not its echoes).
        ranked = sorted((-len(found - common), i) for found, i in zip(held, offloaded.tolist(), strict=True)
                        if found - common)
        chosen = [i for _, i in ranked[:_MAX_RECALLED]]
        del view
        if chosen:
            self._bring_back(ws, chosen, at, em, "a later turn names what they hold")

    def _bring_back(self, ws: WorkingSet, chosen: list[int], at: int, em: _Emitter, why: str) -> None:
        """Recall the offloaded items at ``chosen`` with their tool groups, to the context's tail."""
        view = ws.view()
        group = np.where(view["pair"] >= 0, view["pair"], view["uid"])
        named = np.zeros(len(view), dtype=bool)
        named[chosen] = True
        named = ((view["flags"] & OFFLOADED) != 0) & np.isin(group, group[named])
        ids = ws.item_ids()
        index = np.flatnonzero(named).tolist()
        affected = [(ids[i], int(view["tokens"][i]), int(view["slot"][i])) for i in index]
        records = [(view[i:i + 1].copy(), ws.entry_of(i)) for i in index]
        tail = int(view["order"].max())
        del view, named, group
        ws.keep(~np.isin(ws.view()["uid"], [int(r["uid"][0]) for r, _ in records]))
        for step, (record, entry) in enumerate(records, 1):
            record["flags"] = (record["flags"] & np.uint8(0xFF ^ OFFLOADED)) | RECALLED
            record["order"], record["ref"] = tail + step, at
            record["refs"] = np.minimum(record["refs"].astype(np.int32) + 1, 0xFFFF)
            ws.freed[int(record["slot"][0])] -= int(record["tokens"][0])
            ws.insert_entry(record, entry)
        em.step(DecisionKind.RECALL, int(records[0][0]["uid"][0]), affected, None,
                -sum(tok for _, tok, _ in affected), None, ws, why, 0)

    # ---- compression ------------------------------------------------------------------------------------------
    def _request_compression(
        self, ws: WorkingSet, t: TurnEvent, budget: EffectiveBudget, policy: EvictionPolicy, em: _Emitter
    ) -> CompressionJob | None:
        """At ``compress_at`` of a slot, ask the summarizers for a summary of its oldest ``compress_share``."""
        if ws.job_id is not None or ws.prepared is not None:
            return None
        for slot, limit in enumerate(budget.slot_limits):
            if limit is None:
                continue
            live = ws.live_tokens(slot)
            if live < policy.compress_at * limit.cap or live < ws.backoff_of(slot):
                continue
            live_m, movable = self._candidates(ws, policy, in_jobs=False)
            view = ws.view()
            ok = live_m & movable & (view["slot"] == slot) & ((view["flags"] & MASKED) == 0)
            ok &= view["depth"] < MAX_DEPTH
            group = np.where(view["pair"] >= 0, view["pair"], view["uid"])
            chosen: list[int] = []
            tokens = 0
            for i in np.flatnonzero(ok).tolist():
                if tokens >= policy.compress_share * live:
                    break
                g = group[i]
                idx = np.flatnonzero(group == g).tolist()
                if not all(ok[j] for j in idx) or i in chosen:
                    continue
                for j in idx:
                    if j not in chosen:
                        chosen.append(j)
                        tokens += int(view["tokens"][j])
            chosen.sort()
            gain = int(tokens * (1 - EXPECTED_RATIO))
            if len(chosen) < 2 or gain < policy.min_gain * limit.cap:
                # Not worth a summary now: wait until the slot has grown by min_gain of its cap.
                ws.back_off(slot, live + math.ceil(policy.min_gain * limit.cap))
                del view
                continue
            ids = ws.item_ids()
            job_id = decision_id(t.tenant_id, t.event_id, DecisionKind.COMPRESS, f"job:{SLOTS[slot].value}")
            sources = [
                CompressionSource(
                    item_id=ids[i], content_digest=view["digest"][i:i + 1].tobytes().hex(),
                    tokens=int(view["tokens"][i]), depth=int(view["depth"][i]),
                    topic="summaries" if view["flags"][i] & SUMMARY and view["depth"][i] else "turns",
                    partition=ws.partition, offset=int(view["offset"][i]),
                    label=_label(int(view["kind"][i])),
                )
                for i in chosen
            ]
            view["flags"][chosen] |= IN_JOB
            affected = [(ids[i], int(view["tokens"][i]), slot) for i in chosen]
            del view
            ws.job_id, ws.job_slot, ws.job_ms = job_id, slot, to_ms(t.occurred_at)
            em.step(DecisionKind.COMPRESS, -1, affected, slot, 0, limit, ws,
                    f"slot at {live} of cap {limit.cap} (compress at {policy.compress_at:.0%}): summary of the oldest "
                    f"{len(chosen)} items ({tokens} tokens) requested", 0, job_id=job_id)
            return CompressionJob(
                job_id=job_id, tenant_id=t.tenant_id, user_id=t.user_id, session_id=t.session_id, run_id=t.run_id,
                slot=SLOTS[slot], sources=sources, max_tokens=max(int(tokens * SUMMARY_ROOM), 16),
                policy_version=em.policy_version, model=t.model, requested_at=t.occurred_at,
            )
        return None

    def _swap_if_due(
        self, ws: WorkingSet, budget: EffectiveBudget, policy: EvictionPolicy, em: _Emitter, force: bool,
        now_ms: int,
    ) -> None:
        """Swap the prepared summary in once its slot reaches ``swap_at`` (or at once when ``force``).

        A job still unanswered when its slot reaches ``swap_at``, or :data:`JOB_PATIENCE_MS` of event time after it
        was asked for, is given up (:meth:`_give_up`).
        """
        p = ws.prepared
        if p is None:
            limit = budget.slot_limits[ws.job_slot] if ws.job_id is not None else None
            late = now_ms - ws.job_ms > JOB_PATIENCE_MS
            if limit is not None and (late or ws.live_tokens(ws.job_slot) >= policy.swap_at * limit.cap):
                self._give_up(ws, limit)
            return
        limit = budget.slot_limits[p.slot]
        if not self._sources_live(ws, p):
            ws.prepared = None
            return
        if force or (limit is not None and ws.live_tokens(p.slot) >= policy.swap_at * limit.cap):
            self._apply(ws, DecisionKind.SWAP, list(p.source_uids), p.slot, limit, em,
                        why=f"slot reached swap at {policy.swap_at:.0%}")

    @staticmethod
    def _give_up(ws: WorkingSet, limit: Limit) -> None:
        """Stop waiting for the pending summary (its summarizer refused the job, or lags): its items are no longer
        held for it, and the slot is not compressed again before it outgrows its cap (relief keeps it below
        that), so a summarizer that does not answer cannot hold the slot's oldest items job after job."""
        view = ws.view()
        view["flags"] &= np.uint8(0xFF ^ IN_JOB)
        del view
        ws.back_off(ws.job_slot, ws.live_tokens(ws.job_slot) + limit.cap)
        ws.job_id, ws.job_slot = None, -1

    def _summary(self, s: Summary, pos: Position, state: BudgetStore, now: datetime) -> list[Output]:
        """A summarizer's answer: keep it for the swap if it frees enough, else back off."""
        key = run_key(s.tenant_id, s.run_id)
        ws: WorkingSet | None = state.get_state(TABLE, key)
        if ws is None or pos.offset <= ws.offsets[SUMMARIES]:
            return []  # a retired run's, or applied already
        ws.offsets[SUMMARIES] = pos.offset
        if ws.who is None:
            ws.who = (sys.intern(s.user_id), s.session_id)
        out: list[Output] = []
        if s.job_id == ws.job_id:
            view = ws.view()
            ids = ws.item_ids()
            by_id = {ids[i]: int(view["uid"][i]) for i in np.flatnonzero(view["flags"] & IN_JOB).tolist()}
            view["flags"] &= ~np.uint8(IN_JOB)
            slot = ws.job_slot
            del view
            ws.job_id, ws.job_slot = None, -1
            uids = [by_id.get(i, -1) for i in s.source_ids]
            budget = self.budget.budget(state, s.tenant_id, s.user_id)
            policy = self.policy(state, s.tenant_id)
            limit = budget.slot_limits[slot]
            prepared = PreparedSummary(
                s.summary_id, s.job_id, slot, s.text, s.token_count, uids, list(s.source_ids),
                list(s.source_digests), s.summarizer, s.summarizer_version, s.depth, float(s.fidelity),
                pos.partition, pos.offset,
            )
            sources = 0 if -1 in uids else int(ws.view()["tokens"][np.isin(ws.view()["uid"], uids)].sum())
            worth = sources - s.token_count >= policy.min_gain * limit.cap if limit is not None else False
            if -1 in uids or not worth or s.fidelity < MIN_FIDELITY:
                # Sources gone, too little gain or too many facts lost: no swap; do not ask again before the
                # slot grows.
                if limit is not None:
                    ws.back_off(slot, ws.live_tokens(slot) + math.ceil(policy.min_gain * limit.cap))
            else:
                ws.prepared = prepared
                strategy = self.strategy or policy.strategy
                run = state.get_run(key)
                em = _Emitter(s, s.summary_id, budget, strategy, now, self.prices, run.model if run else None)
                self._swap_if_due(ws, budget, policy, em, force=False, now_ms=to_ms(s.produced_at))
                out += em.out
        state.put_state(TABLE, key, ws)
        out.append(Relief(s, s.summary_id, SUMMARIES_STREAM, pos.offset, tuple(ws.freed)))
        return out

    # ---- deletions ----------------------------------------------------------------------------------------------
    def _invalidation(self, inv: Invalidation, pos: Position, state: BudgetStore, now: datetime) -> list[Output]:
        """A summary one of whose source memories was deleted (:func:`processors.memory.cascade.summary_invalidation`):
        its text leaves the run's working set, whether it waits to be swapped in or already was.

        Idempotent: a record the working set holds (its offset) changes nothing again, and neither does one naming
        a summary the working set no longer holds (dropped, evicted, never taken: it is not written then). Exact
        under a crash as a summary is: the working set is persisted after the run ledger, which records the
        relief's offset (:meth:`processors.budget.BudgetProcessor.relieve`), so a replay re-applying it here finds
        the budget holding its relief already."""
        if inv.target_type != SUMMARY_TARGET or inv.run_id is None:
            return []  # another layer's (records, index rows, payloads, turn content): nothing the planner holds
        key = run_key(inv.tenant_id, inv.run_id)
        ws: WorkingSet | None = state.get_state(TABLE, key)
        if ws is None or pos.offset <= ws.offsets[INVALIDATIONS]:
            return []  # a run the planner never saw or retired, or applied already
        summary_id = inv.target_id
        prepared = ws.prepared is not None and ws.prepared.summary_id == summary_id
        view = ws.view()
        summaries = np.flatnonzero((view["flags"] & SUMMARY) != 0).tolist()
        ids = ws.item_ids() if summaries else []
        swapped = [i for i in summaries if ids[i] == summary_id]
        uids, slot = [int(view["uid"][i]) for i in swapped], int(view["slot"][swapped[0]]) if swapped else -1
        del view
        if not prepared and not swapped:
            return []
        ws.offsets[INVALIDATIONS] = pos.offset
        if prepared:
            ws.prepared = None  # its text goes; the run asks for another summary when its budget needs one
        # A working set written before it learnt its run's user: the invalidation's (the memory's owner).
        user, session = ws.who or (inv.user_id, inv.session_id)
        run = _RunOf(inv.tenant_id, user, session, inv.run_id)
        out: list[Output] = []
        if swapped:
            budget = self.budget.budget(state, inv.tenant_id, user)
            policy = self.policy(state, inv.tenant_id)
            ledger = state.get_run(key)
            em = _Emitter(run, inv.invalidation_id, budget, self.strategy or policy.strategy, now, self.prices,
                          ledger.model if ledger else None)
            gone = "removed" if inv.kind is InvalidationKind.TOMBSTONE else "withdrawn"
            self._apply(ws, DecisionKind.EVICT, uids, slot, budget.slot_limits[slot], em,
                        why=f"summary {summary_id} {gone}, its source memory deleted ({inv.reason})")
            out += em.out
        state.put_state(TABLE, key, ws)
        if swapped:
            out.append(Relief(run, inv.invalidation_id, INVALIDATIONS_STREAM, pos.offset, tuple(ws.freed)))
        return out


@dataclass(frozen=True, slots=True)
class _RunOf:
    """The run a record concerns, when the record does not say whose it is (an invalidation names the deleted
    memory's user and session): what the planner's decisions and the budget's relief decisions name."""

    tenant_id: str
    user_id: str | None
    session_id: str | None
    run_id: str


_PLACEHOLDER_TOKENS = 16
#: A term more items carry than this names none of them in particular (a tool's name, a common path).
_MAX_TERM_ITEMS = 8
_MAX_RECALLED = 3
#: Offloaded items a run keeps in session memory before the least recently named are evicted for good.
MAX_OFFLOADED = 256


def _label(kind: int) -> str:
    """How a summary attributes a source: ``user message``, ``tool result``, ``assistant tool call``..."""
    role, what = ROLES[kind >> 4].value, KINDS[kind & 15].value.replace("_", " ")
    return what if what.startswith(role) else f"{role} {what}"


class _Emitter:
    """Builds one record's eviction decisions (ids from the record, the kind and the first item: replayable)."""

    def __init__(
        self, event: TurnEvent | Summary | _RunOf, source_id: str, budget: EffectiveBudget, strategy: EvictionStrategy,
        now: datetime, prices: PriceTable, model: str | None,
    ) -> None:
        self.event, self.source_id, self.budget, self.strategy, self.now = event, source_id, budget, strategy, now
        self.price = prices.price(model)[0] if model else prices.fallback
        self.policy_version = f"m{budget.manifest_version or 0}/p{PLANNER_VERSION}/{prices.version}"
        self.out: list[Decision] = []

    def step(
        self, kind: DecisionKind, first_uid: int, items: list[tuple[str, int, int]], slot: int | None,
        freed: int, limit: Limit | None, ws: WorkingSet, why: str, kept_after: int,
        summary: SummaryProvenance | None = None, job_id: str | None = None,
    ) -> None:
        e = self.event
        action = _ACTION_OF[kind]
        used = ws.live_tokens(slot)
        # Next call: the tokens after the first change are written to the prompt cache again, the freed ones
        # are no longer read.
        if kind is DecisionKind.RECALL:  # appended at the tail: written to the cache once, nothing after it moves
            effect = -freed * self.price.cache_write
        else:
            effect = kept_after * (self.price.cache_write - self.price.cached_read) - freed * self.price.cached_read
        where = f"slot {SLOTS[slot].value}" if slot is not None else "total context"
        subject = f"{kind.value}:{first_uid}:{len(self.out)}"
        self.out.append(Decision(
            decision_id=decision_id(e.tenant_id, self.source_id, kind, subject),
            tenant_id=e.tenant_id, user_id=e.user_id, session_id=e.session_id, run_id=e.run_id,
            kind=kind, slot=SLOTS[slot] if slot is not None else None,
            used_tokens=used, cap_tokens=limit.cap if limit is not None else None,
            reason=f"{kind.value} {len(items)} items ({self.strategy.value}) from {where}: {why}",
            actions=[ItemDecision(item_id=i, action=action, tokens=tok) for i, tok, _ in items],
            source_event_id=self.source_id, manifest_version=self.budget.manifest_version, decided_at=self.now,
            strategy=self.strategy.value, policy_version=self.policy_version, tokens_freed=max(freed, 0),
            summary=summary, cost_effect_micros=round(effect / 1_000_000), job_id=job_id,
        ))
