"""Hardening checks: near-duplicates to merge, and precise contradictions to supersede.

Both compare a new record only with live records of the same tenant, scope and owner (one bucket: see
:func:`~processors.memory.identity.bucket_key`), so nothing ever crosses tenants or users.

**Near-duplicate** (merge; text similarity never retires a record): same type, rapidfuzz
``token_sort_ratio`` of the normalised contents at least :data:`NEAR_DUPLICATE_THRESHOLD`, *and* the same
numbers and the same negations in both (a similarity score cannot tell "is" from "is not", or 5 from 6), *and*,
when both state a subject and attribute, the same subject, attribute and normalised value. ``token_sort_ratio``
rather than ``token_set_ratio``: the set ratio scores 100 when one text's words are a subset of the other's, which
would merge "prefers dark mode" into "prefers dark mode except in reports".

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
"""token_sort_ratio (0-100) at or above which two memories are the same statement. Measured on the near-miss
set in tests/unit/data: paraphrases with reordered or a few changed words score 90-100, distinct statements
that share a topic score below 80; 90 leaves room on both sides."""

LIVE = frozenset({MemoryStatus.PROVISIONAL, MemoryStatus.ACTIVE, MemoryStatus.QUARANTINED})
"""Records a new one can merge into or contradict: not revoked, not already superseded."""

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NEGATIONS = frozenset({"not", "no", "never", "none", "cannot", "without", "nor"})


def _words(text: str) -> list[str]:
    return text.replace("n't", " not").split()


def _numbers(text: str) -> list[str]:
    return sorted(_NUMBER.findall(text))


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
