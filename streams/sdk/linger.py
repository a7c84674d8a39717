"""Sending what an aiokafka producer holds back for its linger, at once.

The SDK lingers (``publish_linger_ms``, 100 ms by default) so that a broker stores few, large batches: the
embedded broker's produce and fetch cost grows with the batches a partition holds, and at 1,500 events/s a
5 ms linger made ~7-record batches that stalled it within minutes. An agent waiting on an answer (an
admission request) must not wait for the linger, so such a record closes every batch the producer holds and
wakes its sender, as aiokafka's own ``flush_for_commit`` does for transactions. Everything queued before the
request goes with it, so the worker sees a run's turns no later than the admission request that follows them.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaProducer

log = logging.getLogger(__name__)
_warned = False


def send_lingering_now(producer: AIOKafkaProducer | None) -> None:
    """Make ``producer`` send every batch it holds now instead of when its linger ends (no waiting for acks).

    Relies on aiokafka's accumulator internals (stable since 0.5); if they change, records simply wait for the
    linger as any other record does, and a warning says so once.
    """
    accumulator = getattr(producer, "_message_accumulator", None)
    try:
        for batches in accumulator._batches.values():  # type: ignore[union-attr]
            for batch in batches:
                batch._builder.close()
        waiter = accumulator._waiter_future  # type: ignore[union-attr]
    except AttributeError:
        global _warned
        if not _warned:
            _warned = True
            log.warning("this aiokafka cannot send lingering batches early; admission requests wait for the linger")
        return
    if not waiter.done():
        waiter.set_result(None)
