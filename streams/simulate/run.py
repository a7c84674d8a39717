"""``ctxflow simulate``: replay recorded transcripts through the real processors, offline.

Each session is one run of a tenant whose manifest caps the history slot at ``budget`` x the session's full
non-system token count (the system prompt sits outside that budget), with the chosen strategy. Messages go
through the worker's processor chain (budget, then eviction planner) over in-memory tables, in order; a
compression job the planner requests is summarized at once by the default summarizer and handed back as the
summarizer worker's :class:`~schemas.models.Summary` would be. Before each assistant message (where the model is
called) the run's context is written out as the model would read it.

Output, one JSONL line per session per assistant message ``step``: ``{"session_id", "step", "tokens",
"context"}``; ``tokens`` is the context's non-system token count; ``context`` entries, in reading order, are
``{"index": i}`` (message i verbatim), ``{"summary": text, "sources": [i, ...]}`` (a summary, or the
placeholder of a masked tool result) or ``{"recalled": i}`` (an offloaded message brought back).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import ProcessorChain
from ctxflow.processors.eviction.planner import EvictionPlanner
from ctxflow.processors.eviction.summarizer import ExtractiveSummarizer, SourceItem, SummaryRefused
from ctxflow.processors.eviction.workset import MASKED, RECALLED, SUMMARY
from ctxflow.processors.manifest import SLOT_INDEX
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position, run_key
from ctxflow.schemas.models import (
    CompressionJob,
    Decision,
    DecisionKind,
    EvictionPolicy,
    EvictionStrategy,
    Role,
    Slot,
    SlotCaps,
    Summary,
    TenantManifest,
    TurnEvent,
)
from ctxflow.streams.simulate.transcripts import EPOCH, Session, as_session, turns_of
from ctxflow.streams.summarizer.jobs import summarize_job

TENANT = "simulated"
MODEL = "gpt-4o"
_HISTORY = SLOT_INDEX[Slot.HISTORY]
_SYSTEM = SLOT_INDEX[Slot.SYSTEM]


@dataclass
class SessionStats:
    """What a simulated session did (for the terminal summary)."""

    steps: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    compressions: int = 0


def simulate_sessions(
    sessions: Iterable[dict[str, Any] | Session], *, budget: float, strategy: str,
    manifest: TenantManifest | None = None, stats: dict[str, SessionStats] | None = None,
) -> Iterator[dict[str, Any]]:
    """The output lines of every session (see the module docstring); ``stats`` collects per-session counts."""
    chosen = EvictionStrategy(strategy)
    counter = TokenCounter()
    for raw in sessions:
        session = raw if isinstance(raw, Session) else as_session(raw)
        yield from _simulate(session, budget, chosen, manifest, counter, stats)


def _manifest(base: TenantManifest | None, cap: int, system: int, strategy: EvictionStrategy) -> TenantManifest:
    caps = SlotCaps(history=max(cap, 1))
    if base is None:
        return TenantManifest(
            tenant_id=TENANT, version=1, tier="standard", slot_caps=caps, total_cap=10 * (cap + system) + 1_000,
            updated_at=EPOCH, eviction=EvictionPolicy(strategy=strategy),
        )
    policy = (base.eviction or EvictionPolicy()).model_copy(update={"strategy": strategy})
    return base.model_copy(update={
        "tenant_id": TENANT, "slot_caps": base.slot_caps.model_copy(update={"history": max(cap, 1)}),
        "total_cap": max(base.total_cap, 10 * (cap + system) + 1_000), "eviction": policy,
    })


def _simulate(
    session: Session, budget: float, strategy: EvictionStrategy, base: TenantManifest | None,
    counter: TokenCounter, stats: dict[str, SessionStats] | None,
) -> Iterator[dict[str, Any]]:
    turns = list(turns_of(session, TENANT, MODEL))
    tokens = [counter.count(t.content or "", MODEL).tokens for t in turns]
    system = sum(n for t, n in zip(turns, tokens, strict=True) if t.slot is Slot.SYSTEM)
    full = sum(tokens) - system
    manifest = _manifest(base, int(budget * full), system, strategy)
    state = DictBudgetState(manifests={TENANT: manifest})
    processor = BudgetProcessor(counter)
    chain = ProcessorChain(processor, [EvictionPlanner(processor, strategy=strategy)])
    texts = {t.item_id: t.content or "" for t in turns}
    index_of = {t.item_id: t.seq for t in turns}
    # What a summary or a placeholder stands for: item id -> (text, message indices it covers).
    stands_for: dict[str, tuple[str, list[int]]] = {}
    summarizer = ExtractiveSummarizer()
    count = lambda text: counter.count(text, MODEL).tokens  # noqa: E731
    key = run_key(TENANT, session.session_id)
    summaries = 0
    tally = SessionStats()
    for turn in turns:
        if turn.role is Role.ASSISTANT:
            yield _snapshot(session.session_id, turn.seq, state.get_state("worksets", key), index_of, stands_for)
            tally.steps += 1
        pending = chain.process(turn, Position("turns", 0, turn.seq), state, EPOCH)
        while pending:
            output = pending.pop(0)
            if isinstance(output, Decision):
                _note(output, stands_for, index_of, tally)
            elif isinstance(output, CompressionJob):
                summary = _summarize(output, texts, summarizer, count, turn)
                if summary is None:
                    continue
                texts[summary.summary_id] = summary.text
                pending += chain.process(summary, Position("summaries", 0, summaries), state, EPOCH)
                summaries += 1
    tally.compressions = summaries
    if stats is not None:
        stats[session.session_id] = tally


def _summarize(
    job: CompressionJob, texts: dict[str, str], summarizer: ExtractiveSummarizer, count: Any, turn: TurnEvent,
) -> Summary | None:
    """What a summarizer worker would publish for ``job`` (None where it would dead-letter the job)."""
    sources = [SourceItem(s.item_id, texts.get(s.item_id, ""), s.depth, label=s.label or "") for s in job.sources]
    try:
        return summarize_job(job, sources, summarizer, count, turn.occurred_at + timedelta(milliseconds=1))
    except SummaryRefused:
        return None


def _note(d: Decision, stands_for: dict[str, tuple[str, list[int]]], index_of: dict[str, int],
          tally: SessionStats) -> None:
    tally.decisions[d.kind.value] = tally.decisions.get(d.kind.value, 0) + 1
    if d.summary is None or d.summary.text is None:
        return
    covered: list[int] = []
    for source in d.summary.source_ids:
        if source in index_of:
            covered.append(index_of[source])
        elif source in stands_for:  # a summary of a summary covers what that one covered
            covered += stands_for[source][1]
    if d.kind is DecisionKind.MASK:
        stands_for[d.actions[0].item_id] = (d.summary.text, covered)
    elif d.kind is DecisionKind.SWAP:
        stands_for[d.summary.summary_id] = (d.summary.text, sorted(covered))


def _snapshot(session_id: str, step: int, ws: Any, index_of: dict[str, int],
              stands_for: dict[str, tuple[str, list[int]]]) -> dict[str, Any]:
    context: list[dict[str, Any]] = []
    tokens = 0
    for item_id, flags, slot, n in ws.context() if ws is not None else []:
        if slot != _SYSTEM:
            tokens += n
        if flags & SUMMARY or flags & MASKED:
            text, sources = stands_for.get(item_id, ("", [index_of.get(item_id, -1)]))
            context.append({"summary": text, "sources": sources})
        elif flags & RECALLED:
            context.append({"recalled": index_of[item_id]})
        else:
            context.append({"index": index_of[item_id]})
    return {"session_id": session_id, "step": step, "tokens": tokens, "context": context}
