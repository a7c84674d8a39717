"""The dedup window of memory candidates and commands: their verdicts and outcomes retire after it, and a record
later than it is refused.

A stored verdict (``memory_verdicts``) makes a redelivered candidate change nothing, a stored outcome
(``memory_commands``) a redelivered command; kept for ever they would grow with every candidate and command
ever read. They retire the way the budget's run ledgers do (:mod:`processors.retention`), on event time and
over the same retention window ``R`` (``CTXFLOW_RUN_RETENTION_S``), per tenant and per stream: candidates
(``occurred_at``) and commands (``issued_at``), each the tenant's own stream in one partition, read in offset
order, so what a record sees depends only on the records before it in its stream: the same live and in every
replay, however the streams interleave.

1. *Late records are refused.* A candidate or command whose event time is more than ``R`` behind the largest
   event time of its stream in its tenant is not judged or applied: the processor returns a
   :class:`LateRecord`, which the worker dead-letters (``outside_dedup_window``; a candidate's content is not
   kept in the dead letter: it was never scanned for secrets).
2. *Dedup state retires after the window.* Every judged candidate and applied command is filed under the bucket
   (``R / 16`` wide) of its event time; once the stream's largest event time minus ``R`` passes a bucket's end,
   the verdicts (outcomes) and ``memory_applied`` entries of its ids are deleted.

Exact within the window, and a late duplicate refused, never counted: a duplicate carries its original's event
time ``t``. If the original's verdict retired, its bucket ended at or before ``W - R`` for the stream's largest
time ``W`` then, so ``t < W - R``; ``W`` only grows, so the duplicate is refused by rule 1. A duplicate that is
not late finds its verdict (its bucket has not ended before ``W - R``). The cost: a candidate more than ``R``
behind the newest of its tenant is refused even when it is no duplicate (as a turn that late is).

State (table ``memory_dedup``, persisted after every other memory table: it decides which records are too late,
so it must never be ahead of what their judgements wrote): ``tenant:<stream>`` -> the largest event time (epoch
ms); ``tenant:<stream>:due`` -> the buckets holding ids, ascending; ``tenant:<stream>:due:<bucket>`` -> how many
pages of ids it holds; ``tenant:<stream>:due:<bucket>:<page>`` -> the ids. A replay that finds a verdict or
outcome files its id again (the filing may not have been durable with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ctxflow.processors.memory.store import DEDUP
from ctxflow.processors.retention import DEFAULT_RETENTION, Retention
from ctxflow.processors.types import BudgetStore
from ctxflow.processors.windows import to_ms

CANDIDATES, COMMANDS = "candidates", "commands"
"""The two streams whose ids the window keeps."""
PAGE = 512
"""Ids per page of a window bucket (a busy tenant files thousands of candidates per bucket)."""


@dataclass(frozen=True, slots=True)
class LateRecord:
    """A candidate or command later than its stream's dedup window: the worker dead-letters it with ``reason``
    (the original's bytes kept only when ``keep_original``)."""

    tenant_id: str
    stream: str
    record_id: str
    reason: str
    keep_original: bool


class DedupWindow:
    """Rules 1 and 2 of the module docstring over the ``memory_dedup`` table."""

    def __init__(self, retention: Retention = DEFAULT_RETENTION) -> None:
        self.retention = retention

    def late(self, state: BudgetStore, tenant_id: str, stream: str, at: datetime, record_id: str) -> LateRecord | None:
        """Rule 1: the refusal of a record of ``stream`` stamped ``at``, or None when it is inside the window."""
        mark = state.get_state(DEDUP, f"{tenant_id}:{stream}")
        window = self.retention.window_ms
        if mark is None or to_ms(at) >= mark - window:
            return None
        reason = (
            f"event time {at.isoformat()} is older than the dedup window (retention {window / 1000:g} s) behind "
            f"the tenant's {stream} event time {datetime.fromtimestamp(mark / 1000, at.tzinfo).isoformat()}: its "
            "verdict or outcome may be retired, so it cannot be applied exactly once"
        )
        return LateRecord(tenant_id, stream, record_id, reason, keep_original=stream == COMMANDS)

    def note(self, state: BudgetStore, tenant_id: str, stream: str, at: datetime, record_id: str,
             forget: Callable[[str], None], *, seen: bool = False) -> None:
        """File ``record_id`` (an admitted record of ``stream`` stamped ``at``), advance the stream's event time,
        and ``forget`` every id of a bucket that ended before the window (rule 2). Filing appends to the bucket's
        last page of ids (:data:`PAGE` of them): a write rewrites one page, never the whole bucket.
        ``seen``: the id was applied before (a redelivery, or a replay whose filing may not have been durable):
        filed only if its bucket does not hold it yet (a read of the bucket's pages: redeliveries are rare)."""
        ms, bucket_ms = to_ms(at), self.retention.bucket_ms
        prefix = f"{tenant_id}:{stream}"
        bucket = ms // bucket_ms
        if not (seen and self._filed(state, f"{prefix}:due:{bucket}", record_id)):
            self._file(state, prefix, bucket, record_id)
        mark = state.get_state(DEDUP, prefix)
        if mark is not None and ms <= mark:
            return
        state.put_state(DEDUP, prefix, ms)
        cutoff = ms - self.retention.window_ms
        buckets = state.get_state(DEDUP, f"{prefix}:due") or []
        due = [b for b in buckets if (b + 1) * bucket_ms <= cutoff]
        if not due:
            return
        for old in due:
            for page in range(state.get_state(DEDUP, f"{prefix}:due:{old}") or 0):
                for retired in state.get_state(DEDUP, f"{prefix}:due:{old}:{page}") or []:
                    forget(retired)
                state.delete_state(DEDUP, f"{prefix}:due:{old}:{page}")
            state.delete_state(DEDUP, f"{prefix}:due:{old}")
        rest = buckets[len(due):]
        if rest:
            state.put_state(DEDUP, f"{prefix}:due", rest)
        else:
            state.delete_state(DEDUP, f"{prefix}:due")

    @staticmethod
    def _filed(state: BudgetStore, key: str, record_id: str) -> bool:
        pages = state.get_state(DEDUP, key) or 0
        return any(record_id in (state.get_state(DEDUP, f"{key}:{page}") or ()) for page in range(pages))

    @staticmethod
    def _file(state: BudgetStore, prefix: str, bucket: int, record_id: str) -> None:
        # Every step tolerates any of these keys missing (a crash between two of them): the replay files the same
        # ids again, in the same order.
        buckets = state.get_state(DEDUP, f"{prefix}:due") or []
        if bucket not in buckets:
            state.put_state(DEDUP, f"{prefix}:due", sorted([*buckets, bucket]))
        key = f"{prefix}:due:{bucket}"
        pages = state.get_state(DEDUP, key) or 0
        last = state.get_state(DEDUP, f"{key}:{pages - 1}") or [] if pages else None
        if last is not None and len(last) < PAGE:
            state.put_state(DEDUP, f"{key}:{pages - 1}", [*last, record_id])
            return
        state.put_state(DEDUP, key, pages + 1)
        state.put_state(DEDUP, f"{key}:{pages}", [record_id])
