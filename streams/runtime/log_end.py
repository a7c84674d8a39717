"""The true end of a partition's log, for anything that reads a topic "up to its end".

The embedded broker (Tansu 0.6, memory engine) answers ListOffsets(latest), which is aiokafka's
``end_offsets`` and ``seek_to_end``, with the *base* offset of the partition's last record batch plus one.
When that batch holds several records (a producer batches whatever it sends within ``linger_ms``), the
answer is short: lag and record counts come out low, ``seek_to_end`` lands inside the batch so a "new records
only" reader gets its later records as if they were new, and a reader that stops at the reported end gets
them only because fetches return whole batches.

A fetch returns whole batches, so fetching from the reported end minus one returns the last batch entire, and
the consumer's position after it is the real end. On a broker that reports correctly this costs one fetch
of the last record and gives the same answer.

A consumer already assigned exactly these partitions is not assigned them again. Re-assigning cancels the
fetch in flight (Tansu holds every fetch for the whole fetch wait, so one nearly always is), aiokafka 0.14's
fetcher then awaits that cancelled fetch, and a ``stop()`` arriving meanwhile is handed to the fetch, which
swallows it: ``stop()`` never returns. ``TopicReader.until_end`` over partitions that never held a record
(nothing to fetch after the re-assign) followed by closing the reader hung that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: worker_process imports this and loads aiokafka only when it waits
    from aiokafka import AIOKafkaConsumer, TopicPartition


async def log_end_offsets(consumer: AIOKafkaConsumer, partitions: Sequence[TopicPartition]
                          ) -> dict[TopicPartition, int]:
    """One past the last offset of each partition, as of this call.

    ``consumer`` must be group-less (manual assignment): it is left assigned to exactly ``partitions``,
    positioned at the returned ends, so a caller that reads from elsewhere seeks afterwards. Waits as long
    as the broker takes to serve the last batches: bound it with ``asyncio.timeout`` where that matters.
    """
    wanted = list(partitions)
    reported = await consumer.end_offsets(wanted)
    if consumer.assignment() != set(wanted):  # never re-assign the same partitions: see the module docstring
        consumer.assign(wanted)
    for tp in wanted:
        consumer.seek(tp, max(reported[tp] - 1, 0))
    while [tp for tp in wanted if await consumer.position(tp) < reported[tp]]:
        await consumer.getmany(*wanted, timeout_ms=200)
    return {tp: max(reported[tp], await consumer.position(tp)) for tp in wanted}
