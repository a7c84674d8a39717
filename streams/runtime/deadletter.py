"""Dead letters: a rejected record becomes an output with its reason, never a log line.

The dead letter's id is its source position, so a batch replayed after a crash produces the same dead
letter again and every projection keeps one copy.
"""

from __future__ import annotations

from datetime import datetime

from ctxflow.schemas.contract import RejectedRecord
from ctxflow.schemas.models import DeadLetter


def dead_letter(
    error: RejectedRecord,
    *,
    topic: str,
    partition: int,
    offset: int,
    original: bytes,
    failed_at: datetime,
) -> DeadLetter:
    """The dead letter for a record the worker refused at ``topic/partition/offset``.

    The original bytes are kept so an operator can repair and re-publish the record, except when the record
    declared ``no_retention``: then only metadata survives, as for every other durable store.
    """
    return DeadLetter(
        dead_letter_id=f"{topic}:{partition}:{offset}",
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        tenant_id=error.tenant_id,
        reason_code=error.reason_code,
        reason=error.reason or error.reason_code,
        original=None if error.no_retention else original,
        failed_at=failed_at,
    )
