"""The default summarizer: offline, deterministic, extractive and fidelity-aware.

A summary is made of whole sentences copied from its sources (never reworded) and, when sentences cannot carry
every identifier and number within the budget, one ``facts:`` line listing the rest verbatim. Its shape::

    user: My goal is to migrate the orders table before Friday. … You must not touch billing.
    [tool read_file] ValueError: bad key max_retries in src/app/main.py line 118.
    facts: ORD-10432; $19.99; 2026-03-14

* Each line holds the extracts of one source, in source order, after a compact attribution: ``[role label]``
  when the source has a label (a tool name), ``role:`` when it has only a role, ``-`` otherwise. Extracts that
  are not contiguous on one line of the source are joined by `` … ``; every extract is a verbatim slice.
* Sentences are chosen in three tiers: those stating a goal, a constraint or a decision (kept verbatim whatever
  terms they hold); then, greedily by new terms per token, those that carry identifiers and numbers no chosen
  sentence carries yet (a term weighs ``min(len, 8) / 8``, so "Processing batch 3 of 12" is too thin to be worth
  its tokens, below :data:`MIN_DENSITY`, and its numbers go to the facts line instead); then the first sentence
  of a source that nothing else represents (no terms, no goal, constraint or decision), for its gist. Filler
  (sentences with none of that) is dropped, and so are exact repeats.
* The terms no chosen sentence holds go to the facts line. It is what keeps fidelity at 1.0 whenever the budget
  can hold the facts line alone: sentences are taken only while the facts line for what they leave out still
  fits. When even the facts line cannot fit, it keeps the most distinctive terms
  (:func:`~ctxflow.processors.eviction.features.distinctiveness`) that fit, reads ``facts (partial):``, and
  fidelity falls, measured.

Budget: the text never exceeds ``max_tokens`` as measured by the caller's ``count``; estimates made while
choosing are checked against ``count`` on the rendered text, and sentences (then facts) are let go until it fits.
Below ``max_tokens`` the summarizer aims at :data:`TARGET_RATIO` of the sources' tokens, raised to whatever the
goal/constraint/decision sentences and the full facts line need, so verbose tool output shrinks to a fraction
without losing a term.

Fidelity is measured, not estimated: the share of the union of the sources' identifiers and numbers
(:func:`~ctxflow.processors.eviction.features.extract`) that occur in the final text verbatim as whole words
(not preceded or followed by a letter, digit or underscore), 1.0 when the sources have none. A short term that
occurs whole inside a longer one counts as present (the ``2`` of ``db-replica-2``): it is there verbatim.

Deterministic: no clock, randomness or I/O, and every choice is ordered by explicit keys (never by set or hash
order), so the same sources, budget and ``count`` give the same summary in every process.
"""

from __future__ import annotations

import heapq
import math
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ctxflow.processors.eviction.features import Features, distinctiveness, extract
from ctxflow.schemas.models import content_digest

__all__ = [
    "FACTS",
    "FACTS_PARTIAL",
    "GAP",
    "MAX_DEPTH",
    "MIN_DENSITY",
    "TARGET_RATIO",
    "ExtractiveSummarizer",
    "SourceItem",
    "Summary",
    "SummaryRefused",
    "facts_line",
    "measure_fidelity",
]

#: A summary's depth is its deepest source's depth + 1; summaries of summaries stop here.
MAX_DEPTH = 2
#: The share of the sources' tokens a summary aims at when ``max_tokens`` allows more.
TARGET_RATIO = 0.3
FACTS = "facts:"
FACTS_PARTIAL = "facts (partial):"
#: The least weighted new terms per token for a sentence to be chosen for its terms (else they go to facts).
MIN_DENSITY = 1 / 24
#: Joins extracts of one source that are not contiguous on one of its lines.
GAP = " … "

_SENTENCE_BREAK = re.compile(r"[.!?]\s+")
_FACTS_LINE = re.compile(r"^(?:facts:|facts \(partial\):)")


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One item to summarize: an original context item (depth 0) or a summary being re-summarized."""

    item_id: str
    text: str
    depth: int = 0
    role: str = ""
    label: str = ""


@dataclass(frozen=True, slots=True)
class Summary:
    """A summary with its provenance (sources, their digests, summarizer and version, depth) and fidelity."""

    text: str
    source_ids: tuple[str, ...]
    source_digests: tuple[str, ...]
    summarizer: str
    version: str
    depth: int
    fidelity: float


class SummaryRefused(ValueError):
    """The sources cannot be summarized: none given, one already at :data:`MAX_DEPTH`, or a budget too small to
    hold a single fact or sentence."""


def facts_line(terms: Iterable[str], *, partial: bool = False) -> str:
    """The facts line listing ``terms`` in the given order: ``facts: a; b; c``."""
    return f"{FACTS_PARTIAL if partial else FACTS} {'; '.join(terms)}"


def _first(term: str, text: str) -> int:
    """Where ``term`` first occurs in ``text`` with no letter, digit or underscore right before or after it; -1
    when it does not."""
    start = text.find(term)
    while start >= 0:
        end = start + len(term)
        if (start == 0 or not _wordish(text[start - 1])) and (end == len(text) or not _wordish(text[end])):
            return start
        start = text.find(term, start + 1)
    return -1


def _present(term: str, text: str) -> bool:
    """``term`` occurs in ``text`` as a whole word: no letter, digit or underscore right before or after it."""
    return _first(term, text) >= 0


def _weight(term: str) -> float:
    """How much a term is worth carrying in a sentence: 1.0 from eight characters, less for short ones (``2``)."""
    return min(len(term), 8) / 8


def _wordish(char: str) -> bool:
    return char.isalnum() or char == "_"


def measure_fidelity(terms: Iterable[str], text: str) -> float:
    """The share of ``terms`` that occur in ``text`` verbatim as whole words; 1.0 when there are none."""
    wanted = set(terms)
    if not wanted:
        return 1.0
    return sum(1 for t in wanted if _present(t, text)) / len(wanted)


@dataclass(frozen=True, slots=True)
class _Segment:
    """A sentence (or a line without sentence breaks) of one source: a verbatim slice of its text."""

    order: int  # position among all segments, in source order
    source: int
    line: int
    start: int
    end: int
    text: str
    terms: frozenset[str]
    tier: int  # 0 goal, 1 constraint, 2 decision, 3 none
    cost: int


def _slices(text: str, skip_facts: bool) -> list[tuple[int, int, int]]:
    """(line number, start, end) of each non-blank sentence of ``text``, stripped of surrounding whitespace."""
    out: list[tuple[int, int, int]] = []
    offset = 0
    for number, line in enumerate(text.split("\n")):
        line_start, offset = offset, offset + len(line) + 1
        if skip_facts and _FACTS_LINE.match(line.lstrip()):
            continue  # a re-summarized summary's facts: its terms go to the new facts line, not a copy of it
        cut = 0
        for brk in _SENTENCE_BREAK.finditer(line):
            out.append((number, line_start + cut, line_start + brk.start() + 1))
            cut = brk.end()
        out.append((number, line_start + cut, line_start + len(line)))
    trimmed = []
    for number, start, end in out:
        piece = text[start:end]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            trimmed.append((number, start + lead, start + lead + len(stripped)))
    return trimmed


def _terms_by_slice(text: str, slices: list[tuple[int, int, int]], terms: Iterable[str]) -> list[set[str]]:
    """For each slice of ``text``, the ``terms`` that occur in it as whole words (one pass over each term)."""
    starts = [start for _, start, _ in slices]
    held: list[set[str]] = [set() for _ in slices]
    for term in terms:
        size = len(term)
        at = text.find(term)
        while at >= 0:
            end = at + size
            if (at == 0 or not _wordish(text[at - 1])) and (end == len(text) or not _wordish(text[end])):
                i = bisect_right(starts, at) - 1
                if i >= 0 and end <= slices[i][2]:
                    held[i].add(term)
            at = text.find(term, at + 1)
    return held


def _attribution(source: SourceItem) -> str:
    role = " ".join(source.role.split())
    label = " ".join(source.label.split()).replace("]", ")")
    if label:  # a label that already names the role ("tool result", "user message") is not prefixed again
        return f"[{role} {label}] " if role and not label.startswith(role) else f"[{label}] "
    return f"{role}: " if role else "- "


class ExtractiveSummarizer:
    """Summarizes sources by copying the sentences that matter and listing the remaining terms verbatim.

    Guarantees: the text never exceeds ``max_tokens`` by ``count``; every sentence in it occurs in a source;
    fidelity is measured on the final text; the same input gives the same output.
    """

    name = "extractive"
    version = "1"

    def summarize(self, sources: Sequence[SourceItem], max_tokens: int, count: Callable[[str], int]) -> Summary:
        """Summarize ``sources`` into at most ``max_tokens`` tokens as measured by ``count``.

        Raises :class:`SummaryRefused` when there are no sources, when a source is already at
        :data:`MAX_DEPTH` (summaries of summaries stop at depth 2), or when ``max_tokens`` cannot hold even one
        fact or sentence.
        """
        sources = tuple(sources)
        if not sources:
            raise SummaryRefused("nothing to summarize: no sources")
        for source in sources:
            if source.depth < 0:
                raise SummaryRefused(f"source {source.item_id!r} has a negative depth ({source.depth})")
            if source.depth >= MAX_DEPTH:
                raise SummaryRefused(
                    f"summaries of summaries stop at depth {MAX_DEPTH}: source {source.item_id!r} is at depth "
                    f"{source.depth}"
                )
        if max_tokens < 1:
            raise SummaryRefused(f"max_tokens must be at least 1, not {max_tokens}")
        plan = _Plan(sources, max_tokens, count)
        text = plan.text()
        if not text and any(s.text.strip() for s in sources):
            raise SummaryRefused(f"max_tokens={max_tokens} cannot hold a single fact or sentence of the sources")
        return Summary(
            text=text,
            source_ids=tuple(s.item_id for s in sources),
            source_digests=tuple(content_digest(s.text) for s in sources),
            summarizer=self.name,
            version=self.version,
            depth=max(s.depth for s in sources) + 1,
            fidelity=measure_fidelity(plan.terms, text),
        )


def _terms(sources: Sequence[SourceItem], features: Sequence[Features]) -> list[str]:
    """The union of the sources' identifiers and numbers, in order of first appearance."""
    seen: set[str] = set()
    ordered: list[str] = []
    for source, found in zip(sources, features, strict=True):
        for term in sorted(found.identifiers | found.numbers, key=lambda t: (_first(t, source.text), t)):
            if term not in seen:
                seen.add(term)
                ordered.append(term)
    return ordered


class _Plan:
    """One summarization: segments, their costs, the greedy choice, and the fit to ``max_tokens``."""

    def __init__(self, sources: tuple[SourceItem, ...], max_tokens: int, count: Callable[[str], int]) -> None:
        self.sources = sources
        self.max_tokens = max_tokens
        self.count = count
        self.features = [extract(s.text) for s in sources]
        self.terms = _terms(sources, self.features)
        self.rank = {t: i for i, t in enumerate(self.terms)}
        self.prefixes = [_attribution(s) for s in sources]
        self.fact_cost = {t: count(f"{t};") for t in self.terms}  # a term's share of the facts line
        self.segments = self._segments()

    def _segments(self) -> list[_Segment]:
        segments: list[_Segment] = []
        seen: set[str] = set()
        for index, (source, features) in enumerate(zip(self.sources, self.features, strict=True)):
            slices = _slices(source.text, skip_facts=source.depth > 0)
            held = _terms_by_slice(source.text, slices, features.identifiers | features.numbers)
            flagged = features.goal or features.constraint or features.decision
            for (line, start, end), terms in zip(slices, held, strict=True):
                text = source.text[start:end]
                if text in seen:
                    continue  # an exact repeat says nothing new
                seen.add(text)
                tier = 3
                if flagged:
                    found = extract(text)
                    tier = 0 if found.goal else 1 if found.constraint else 2 if found.decision else 3
                segments.append(_Segment(len(segments), index, line, start, end, text, frozenset(terms), tier,
                                         self.count(text)))
        return segments

    # -- rendering -------------------------------------------------------------------------------------------

    def _body(self, chosen: Iterable[_Segment]) -> str:
        by_source: dict[int, list[_Segment]] = {}
        for segment in sorted(chosen, key=lambda s: s.order):
            by_source.setdefault(segment.source, []).append(segment)
        lines = []
        for index, segments in sorted(by_source.items()):
            text = self.sources[index].text
            chunks: list[tuple[int, int]] = []
            previous: _Segment | None = None
            for segment in segments:
                if previous is not None and previous.line == segment.line and previous.order + 1 == segment.order:
                    chunks[-1] = (chunks[-1][0], segment.end)  # contiguous on one line: one verbatim slice
                else:
                    chunks.append((segment.start, segment.end))
                previous = segment
            lines.append(self.prefixes[index] + GAP.join(text[a:b] for a, b in chunks))
        return "\n".join(lines)

    def _missing(self, body: str) -> list[str]:
        """The terms ``body`` does not hold, less those a longer missing term already holds, in first-seen order."""
        missing = [t for t in self.terms if not _present(t, body)]
        kept: list[str] = []
        listed = ""
        for term in sorted(missing, key=lambda t: (-len(t), t)):
            if not _present(term, listed):
                kept.append(term)
                listed += "\n" + term
        return sorted(kept, key=self.rank.__getitem__)

    @staticmethod
    def _join(body: str, facts: list[str], partial: bool) -> str:
        if not facts:
            return body
        line = facts_line(facts, partial=partial)
        return f"{body}\n{line}" if body else line

    # -- choosing --------------------------------------------------------------------------------------------

    def text(self) -> str:
        count = self.count
        fact_cost = self.fact_cost
        header = count(FACTS)
        source_tokens = sum(count(s.text) for s in self.sources)
        flagged = [s for s in self.segments if s.tier < 3]
        flagged_cost = sum(s.cost + 1 for s in flagged) + sum(  # + 1: a gap or a line break each
            count(self.prefixes[i]) for i in sorted({s.source for s in flagged})
        )
        full_facts = count(facts_line(self.terms)) if self.terms else 0
        leads = [self._lead(i) for i in range(len(self.sources))]
        gist = min((s.cost + count(self.prefixes[s.source]) for s in leads if s is not None), default=0)
        target = max(math.ceil(TARGET_RATIO * source_tokens), full_facts + flagged_cost, gist)
        budget = min(self.max_tokens, target)

        remaining = set(self.terms)
        estimate = header + sum(fact_cost.values()) if remaining else 0
        chosen: list[_Segment] = []  # in the order accepted, which is the order let go in reverse
        opened: set[int] = set()
        gap = count(GAP.strip()) or 1
        newline = count("\n")

        def delta(segment: _Segment) -> int:
            new = segment.terms & remaining
            saved = sum(fact_cost[t] for t in new) + (header if new and new == remaining else 0)
            line = count(self.prefixes[segment.source]) + newline if segment.source not in opened else gap
            return segment.cost + line - saved

        def accept(segment: _Segment) -> bool:
            nonlocal estimate
            change = delta(segment)
            if estimate + change > budget:
                return False
            estimate += change
            chosen.append(segment)
            opened.add(segment.source)
            remaining.difference_update(segment.terms)
            return True

        for segment in sorted(flagged, key=lambda s: (s.tier, s.order)):
            accept(segment)
        # Sentences carrying terms no chosen sentence carries yet, the most (weighted) new terms per token first
        # (lazy greedy: a sentence's value only falls as others are taken); too thin a sentence is left to facts.
        def value(segment: _Segment) -> float:
            return sum(_weight(t) for t in segment.terms & remaining) / max(segment.cost, 1)

        taken = {s.order for s in chosen}
        heap = [(-value(s), s.order) for s in self.segments if s.order not in taken and s.terms & remaining]
        heapq.heapify(heap)
        while heap:
            _, order = heapq.heappop(heap)
            segment = self.segments[order]
            key = (-value(segment), order)
            if -key[0] < MIN_DENSITY:
                continue
            if heap and key > heap[0]:
                heapq.heappush(heap, key)  # its value fell since it was queued: requeue at its current value
                continue
            accept(segment)
        # The gist of a source that nothing else represents (no sentence taken, no terms, no goal, constraint or
        # decision that could not fit): its first sentence with a letter in it.
        for index, (lead, features) in enumerate(zip(leads, self.features, strict=True)):
            if index in opened or lead is None or features.identifiers or features.numbers:
                continue
            if not (features.goal or features.constraint or features.decision):
                accept(lead)
        return self._fit(chosen)

    def _lead(self, index: int) -> _Segment | None:
        return next((s for s in self.segments if s.source == index and any(c.isalpha() for c in s.text)), None)

    def _fit(self, chosen: list[_Segment]) -> str:
        """The rendered text within ``max_tokens``: let sentences go (last accepted first), then facts."""
        count = self.count
        while True:
            body = self._body(chosen)
            facts = self._missing(body)
            text = self._join(body, facts, partial=False)
            if count(text) <= self.max_tokens:
                return text
            if not chosen:
                break
            chosen = chosen[:-1]
        # Not even the whole facts line fits: keep the most distinctive facts that do, skipping any too long for
        # what is left, then let go of the least distinctive kept until the measured count fits.
        room = self.max_tokens - count(FACTS_PARTIAL)
        kept: list[str] = []
        for term in sorted(facts, key=distinctiveness):
            if self.fact_cost[term] <= room:
                kept.append(term)
                room -= self.fact_cost[term]
        while kept:
            keep = set(kept)
            text = self._join("", [t for t in facts if t in keep], partial=True)
            if count(text) <= self.max_tokens:
                return text
            kept.pop()
        return ""
