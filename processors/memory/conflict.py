"""Hardening checks: near-duplicates to merge, and precise contradictions to supersede.

Both compare a new record only with live records of the same tenant, scope and owner (one bucket: see
:func:`~processors.memory.identity.bucket_key`), so nothing ever crosses tenants or users.

**Near-duplicate** (merge; text similarity never retires a record): same type, rapidfuzz
``token_sort_ratio`` of the normalised contents at least :data:`NEAR_DUPLICATE_THRESHOLD`, *and* the same
numbers and negations in both, and every word found in only one text a function word or a misspelling of a word
of the other (a similarity score cannot tell "is" from "is not", 5 from 6, or Bob from Carol), *and*, when
both state a subject and attribute, the same subject, attribute and normalised value.
``token_sort_ratio`` rather than ``token_set_ratio``: the set ratio scores 100 when one text's words are a
subset of the other's, which would merge "prefers dark mode" into "prefers dark mode except in reports".

**Contradiction** (supersede): both records state a value for the same normalised subject and attribute and
the normalised values differ (:func:`~processors.memory.values.normalise_value`: units, dates, money and case
do not count as differences). Exactly the records with that subject and attribute are returned; records about
another subject or another attribute are never touched, however similar their text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ctxflow.processors.memory.identity import normalise_content
from ctxflow.processors.memory.values import normalise_key, normalise_value
from ctxflow.schemas.models import MemoryRecord, MemoryStatus
from rapidfuzz import fuzz

NEAR_DUPLICATE_THRESHOLD = 90.0
"""token_sort_ratio (0-100) at or above which two memories may be the same statement. On the near-miss set in
tests/unit/data, rewordings ("The user prefers..." / "User prefers...", reordered lists, case and punctuation)
score 94-100 and statements on other topics below 80. But statements that differ in one name, number or
negation also score 90-96 ("Standups last 10 minutes" / "... 15 minutes": 95.8), so the score alone never
decides: numbers and negations must agree and the words that differ must be minor (:data:`TYPO_SIMILARITY`)."""

LIVE = frozenset({MemoryStatus.PROVISIONAL, MemoryStatus.ACTIVE, MemoryStatus.QUARANTINED})
"""Records a new one can merge into or contradict: not revoked, not already superseded."""

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NEGATIONS = frozenset({"not", "no", "never", "none", "cannot", "without", "nor"})


def _words(text: str) -> list[str]:
    return text.replace("n't", " not").split()


def _numbers(text: str) -> list[str]:
    return sorted(_NUMBER.findall(text))


_FUNCTION_WORDS = frozenset(
    {"a", "an", "the", "this", "that", "these", "those", "is", "are", "was", "were", "be", "been", "am", "do",
     "does", "did", "to", "of", "in", "on", "at", "for", "by", "with", "and", "or", "as", "it", "its", "user",
     "users", "they", "we", "i", "he", "she"}
)
"""Words whose presence alone does not change a statement ("The user prefers..." / "User prefers...")."""

TYPO_SIMILARITY = 75.0
"""rapidfuzz ratio at which two differing words are one word misspelt or inflected ("prefer"/"prefers": 92,
"mdoe"/"mode": 75); names ("Bob"/"Carol": 25) and other words ("light"/"dark": 0) stay apart."""


def _tokens(text: str) -> set[str]:
    return {w.strip(".,;:!?'\"()") for w in _words(text)} - {""}


def _differences_are_minor(text: str, other: str) -> bool:
    # A high overall score can hide one decisive word (a name, a product, a colour): every word found in only
    # one of the texts must be a function word or a misspelling of a word of the other text.
    mine, theirs = _tokens(text), _tokens(other)
    for word, pool in [(w, theirs) for w in mine - theirs] + [(w, mine) for w in theirs - mine]:
        if word in _FUNCTION_WORDS:
            continue
        if not any(fuzz.ratio(word, candidate) >= TYPO_SIMILARITY for candidate in pool - _FUNCTION_WORDS):
            return False
    return True


def _negations(text: str) -> int:
    return sum(word.strip(".,;:!?") in _NEGATIONS for word in _words(text))


def fact_key(record: MemoryRecord) -> tuple[str, str] | None:
    """The normalised (subject, attribute) a record states a value for, or None when it states none."""
    if record.subject is None or record.attribute is None or record.value is None:
        return None
    return normalise_key(record.subject), normalise_key(record.attribute)


@dataclass(frozen=True, slots=True)
class Similarity:
    """A near-duplicate found: the record and its score."""

    record: MemoryRecord
    score: float


def near_duplicate(record: MemoryRecord, others: Iterable[MemoryRecord]) -> Similarity | None:
    """The most similar live record of the same type that ``record`` duplicates, or None (rules above)."""
    if record.content is None:
        return None
    text = normalise_content(record.content)
    key = fact_key(record)
    best: Similarity | None = None
    for other in others:
        if other.memory_id == record.memory_id or other.status not in LIVE or other.type is not record.type:
            continue
        if other.content is None:
            continue
        other_text = normalise_content(other.content)
        score = fuzz.token_sort_ratio(text, other_text, score_cutoff=NEAR_DUPLICATE_THRESHOLD)
        if not score or _numbers(text) != _numbers(other_text) or _negations(text) != _negations(other_text):
            continue
        if not _differences_are_minor(text, other_text):
            continue
        other_key = fact_key(other)
        if key is not None and other_key is not None and (
            key != other_key or normalise_value(record.value or "") != normalise_value(other.value or "")
        ):
            continue
        if best is None or score > best.score:
            best = Similarity(other, score)
    return best


def contradictions(record: MemoryRecord, others: Iterable[MemoryRecord]) -> list[MemoryRecord]:
    """The live records stating a different value for exactly ``record``'s subject and attribute."""
    key = fact_key(record)
    if key is None:
        return []
    value = normalise_value(record.value or "")
    return [
        other
        for other in others
        if other.memory_id != record.memory_id
        and other.status in LIVE
        and fact_key(other) == key
        and normalise_value(other.value or "") != value
    ]
