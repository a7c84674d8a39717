"""Scores ``ctxflow simulate`` output for one (strategy, budget) against sessions and their ground truth.

A simulate line is ``{"session_id", "step", "tokens", "context"}``; a context entry is ``{"index": i}``
(message ``i`` verbatim), ``{"recalled": i}`` (message ``i`` brought back verbatim) or ``{"summary": text,
"sources": [i, ...]}``. Definitions, per (strategy, budget), over every output line of every session:

- ``retention``: share of truth references whose item is present at the reference's step. Present: an
  ``index`` or ``recalled`` entry for the item, or a summary whose sources include the item and whose text
  contains every fact verbatim. A reference whose step has no output line is missed (``why: no_step``).
- ``tool_pairing_violations``: steps whose context holds (verbatim) a tool result whose call is absent, or a
  tool call one of whose results (those before the step) is absent. A result pairs with the nearest earlier
  assistant message that issued its ``tool_call_id``. A side that is only in a summary counts as absent,
  unless one summary's sources cover both sides; a summary of the result alone is a masked result (the tool
  message stays, its content a placeholder), so it keeps the pair. ``violating_pairs`` counts the (call,
  result) pairs.
- ``tier0_evictions``: steps missing ``{"index": 0}`` (the system prompt) or the latest user message before
  the step (``index`` or ``recalled``).
- ``tokens_used``: mean ``tokens`` per step; ``tokens_share``: mean of ``tokens`` / the session's full
  non-system tokens, counted here with :func:`message_tokens` (cl100k over content, tool names and arguments;
  simulate may count a per-message overhead this does not).
- ``compressions_per_10_turns``: summary entries whose text was not in the session's previous step, per 10
  steps.
- ``append_only_share``: among steps that have a previous step in their session, the share whose entry
  sequence starts with the previous step's whole sequence (the prompt prefix stayed cacheable).
- ``sessions``: sessions scored (all input sessions; ``missing_sessions`` had no output line at all).

Also ``by_shape`` and ``by_item_kind`` retention, ``loss_reasons`` (``no_step``, ``evicted``: neither the
item nor any summary of it is in the context, ``summary_lost_facts``: a summary covers it without every fact)
and ``losses``: one example per most frequent (shape, item kind, why) group, the one with the shortest gap
between item and step (the least excusable miss), with the group's ``count``. Output problems are counted,
never raised: ``malformed_entries`` (unknown form, index out of range, or a message at or after the step),
``unknown_lines`` (session or step not in the input) and ``missing_steps`` (assistant messages without a line).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache

from ctxflow.processors.tokens import TokenCounter
from ctxflow.streams.simulate.transcripts import text_of

TOKEN_MODEL = "gpt-4o"


@cache
def _counter() -> TokenCounter:
    return TokenCounter()


def message_tokens(msg: dict) -> int:
    """Tokens of what the model reads of a message (``ctxflow simulate``'s own text of it), counted as it counts."""
    return _counter().count(text_of(msg), TOKEN_MODEL).tokens


def tool_pairs(messages: list[dict]) -> dict[int, int | None]:
    """Tool result index -> index of the nearest earlier assistant message that issued its id (None: orphan)."""
    issuer: dict[str, int] = {}
    pairs: dict[int, int | None] = {}
    for i, msg in enumerate(messages):
        if msg.get("role") == "assistant":
            for call in msg.get("tool_calls") or ():
                issuer[call.get("id")] = i
        elif msg.get("role") == "tool":
            pairs[i] = issuer.get(msg.get("tool_call_id"))
    return pairs


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What scoring needs of one session: roles, tool pairs, full tokens and its truth references."""

    session_id: str
    shape: str
    roles: tuple[str, ...]
    pairs: tuple[tuple[int, int], ...]  # (call index, result index)
    full_tokens: int
    references: tuple[dict, ...]

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(i for i, role in enumerate(self.roles) if role == "assistant")


def prepare(sessions: Iterable[dict], truth: Iterable[dict],
            tokens_of: Callable[[dict], int] = message_tokens) -> list[SessionFacts]:
    """One :class:`SessionFacts` per session (``truth`` aligned with ``sessions`` by ``session_id``)."""
    by_id = {t["session_id"]: t for t in truth}
    out = []
    for s in sessions:
        msgs, t = s["messages"], by_id[s["session_id"]]
        pairs = tuple(sorted((a, j) for j, a in tool_pairs(msgs).items() if a is not None))
        out.append(SessionFacts(s["session_id"], t.get("shape", "unknown"), tuple(m["role"] for m in msgs), pairs,
                                sum(tokens_of(m) for m in msgs if m["role"] != "system"),
                                tuple(t["references"])))
    return out


@dataclass(slots=True)
class StepContext:
    """One step's context read into sets: verbatim messages and summaries (text, sources)."""

    entries: list
    verbatim: set[int] = field(default_factory=set)
    indexed: set[int] = field(default_factory=set)
    summaries: list[tuple[str, frozenset[int]]] = field(default_factory=list)
    #: Messages standing as a one-source summary (a masked tool result keeps its message).
    masked: set[int] = field(default_factory=set)
    malformed: int = 0

    @classmethod
    def read(cls, entries: list, step: int) -> StepContext:
        """Entries naming a message at or after ``step`` (or not a message at all) count as malformed."""
        ctx = cls(list(entries))
        for e in ctx.entries:
            i = e.get("index", e.get("recalled")) if isinstance(e, dict) else None
            if isinstance(i, int) and ("index" in e) != ("recalled" in e) and 0 <= i < step:
                ctx.verbatim.add(i)
                if "index" in e:
                    ctx.indexed.add(i)
            elif isinstance(e, dict) and isinstance(e.get("summary"), str) and isinstance(e.get("sources"), list):
                ctx.summaries.append((e["summary"], frozenset(e["sources"])))
                if len(e["sources"]) == 1:
                    ctx.masked.add(e["sources"][0])
                ctx.malformed += any(not isinstance(x, int) or not 0 <= x < step for x in e["sources"])
            else:
                ctx.malformed += 1
        return ctx

    def holds(self, item: int, facts: list[str]) -> str | None:
        """None when ``item`` is present with ``facts``; else why not (``evicted``, ``summary_lost_facts``)."""
        if item in self.verbatim:
            return None
        covering = [text for text, sources in self.summaries if item in sources]
        if any(all(f in text for f in facts) for text in covering):
            return None
        return "summary_lost_facts" if covering else "evicted"

    def violating_pairs(self, pairs: Iterable[tuple[int, int]], step: int) -> int:
        """(call, result) pairs before ``step`` with one side verbatim and the other absent."""
        count = 0
        for call, result in pairs:
            if result >= step:
                continue
            vc, vr = call in self.verbatim, result in self.verbatim or result in self.masked
            if vc == vr:
                continue
            if not any(call in sources and result in sources for _, sources in self.summaries):
                count += 1
        return count


@dataclass
class QualityScore:
    """The figures of one (strategy, budget) run; see the module docstring for each definition."""

    strategy: str
    budget: float
    sessions: int = 0
    steps: int = 0
    references: int = 0
    retained: int = 0
    tool_pairing_violations: int = 0
    violating_pairs: int = 0
    tier0_evictions: int = 0
    tokens_total: float = 0.0
    share_total: float = 0.0
    compressions: int = 0
    append_only: int = 0
    append_checked: int = 0
    missing_steps: int = 0
    missing_sessions: int = 0
    malformed_entries: int = 0
    unknown_lines: int = 0
    by_shape: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    by_item_kind: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    missed: list[dict] = field(default_factory=list)

    @property
    def retention(self) -> float:
        return self.retained / self.references if self.references else 1.0

    def row(self, examples: int = 5) -> dict:
        """The results row: headline figures, breakdowns and the worst losses."""
        steps = max(1, self.steps)
        return {
            "strategy": self.strategy, "budget": self.budget, "retention": round(self.retention, 4),
            "tool_pairing_violations": self.tool_pairing_violations, "violating_pairs": self.violating_pairs,
            "tier0_evictions": self.tier0_evictions, "tokens_used": round(self.tokens_total / steps, 1),
            "tokens_share": round(self.share_total / steps, 4),
            "compressions_per_10_turns": round(10 * self.compressions / steps, 3),
            "append_only_share": round(self.append_only / self.append_checked, 4) if self.append_checked else 1.0,
            "sessions": self.sessions, "steps": self.steps, "references": self.references, "retained": self.retained,
            "missing_steps": self.missing_steps, "missing_sessions": self.missing_sessions,
            "malformed_entries": self.malformed_entries, "unknown_lines": self.unknown_lines,
            "by_shape": _rates(self.by_shape), "by_item_kind": _rates(self.by_item_kind),
            "loss_reasons": dict(Counter(m["why"] for m in self.missed).most_common()),
            "losses": self.worst(examples),
        }

    def worst(self, examples: int = 5) -> list[dict]:
        """One example per most frequent (shape, item kind, why) group: the miss with the shortest gap."""
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for m in self.missed:
            groups[(m["shape"], m["item_kind"], m["why"])].append(m)
        ranked = sorted(groups.values(), key=lambda g: (-len(g), g[0]["shape"], g[0]["item_kind"], g[0]["why"]))
        return [{**min(g, key=lambda m: (m["gap"], m["session_id"], m["item"])), "count": len(g)}
                for g in ranked[:examples]]


def _rates(table: dict[str, list[int]]) -> dict[str, dict]:
    return {k: {"references": n, "retained": kept, "retention": round(kept / n, 4) if n else 1.0}
            for k, (n, kept) in sorted(table.items())}


def score_run(facts: list[SessionFacts], lines: Iterable[dict], *, strategy: str, budget: float) -> QualityScore:
    """Score simulate ``lines`` (any order) for the sessions in ``facts``."""
    known = {f.session_id: f for f in facts}
    by_session: dict[str, dict[int, dict]] = defaultdict(dict)
    score = QualityScore(strategy, budget, sessions=len(facts))
    for line in lines:
        f = known.get(line.get("session_id"))
        step = line.get("step")
        if f is None or not isinstance(step, int) or not 0 <= step < len(f.roles) or f.roles[step] != "assistant":
            score.unknown_lines += 1
            continue
        by_session[f.session_id][step] = line
    for f in facts:
        _score_session(score, f, by_session.get(f.session_id, {}))
    return score


def _score_session(score: QualityScore, f: SessionFacts, lines: dict[int, dict]) -> None:
    if not lines:
        score.missing_sessions += 1
    score.missing_steps += sum(step not in lines for step in f.steps)
    users = [i for i, role in enumerate(f.roles) if role == "user"]
    refs_at: dict[int, list[dict]] = defaultdict(list)
    for ref in f.references:
        refs_at[ref["step"]].append(ref)
    prev: list | None = None
    prev_texts: set[str] = set()
    for step in sorted(lines):
        line = lines[step]
        ctx = StepContext.read(line.get("context") or [], step)
        score.steps += 1
        score.malformed_entries += ctx.malformed
        tokens = float(line.get("tokens") or 0)
        score.tokens_total += tokens
        score.share_total += tokens / f.full_tokens if f.full_tokens else 0.0
        latest_user = max((u for u in users if u < step), default=None)
        if 0 not in ctx.indexed or (latest_user is not None and latest_user not in ctx.verbatim):
            score.tier0_evictions += 1
        pairs = ctx.violating_pairs(f.pairs, step)
        score.violating_pairs += pairs
        score.tool_pairing_violations += pairs > 0
        texts = {text for text, _ in ctx.summaries}
        score.compressions += len(texts - prev_texts)
        if prev is not None:
            score.append_checked += 1
            score.append_only += ctx.entries[: len(prev)] == prev
        prev, prev_texts = ctx.entries, texts
        for ref in refs_at.pop(step, ()):
            _tally(score, f, ref, ctx.holds(ref["item"], ref["facts"]), ref["facts"], ctx)
    for refs in refs_at.values():
        for ref in refs:
            _tally(score, f, ref, "no_step", ref["facts"], None)


def _tally(score: QualityScore, f: SessionFacts, ref: dict, why: str | None, facts: list[str],
           ctx: StepContext | None) -> None:
    kind = ref.get("item_kind", "unknown")
    score.references += 1
    score.by_shape[f.shape][0] += 1
    score.by_item_kind[kind][0] += 1
    if why is None:
        score.retained += 1
        score.by_shape[f.shape][1] += 1
        score.by_item_kind[kind][1] += 1
        return
    lost: list[str] = []
    if why == "summary_lost_facts" and ctx is not None:
        texts = [text for text, sources in ctx.summaries if ref["item"] in sources]
        lost = [x for x in facts if not any(x in t for t in texts)]
    score.missed.append({
        "session_id": f.session_id, "shape": f.shape, "item": ref["item"], "item_kind": kind,
        "fact_kind": ref.get("fact_kind"), "step": ref["step"], "gap": ref["step"] - ref["item"], "why": why,
        "facts": list(facts), "missing_facts": lost,
    })
