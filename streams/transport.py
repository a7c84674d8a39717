"""A Faust app whose Kafka consumer waits at most ``fetch_max_wait_ms`` for data.

Faust's aiokafka driver hard-codes ``fetch_max_wait_ms=1500``. Tansu (the embedded broker) holds a fetch for
about half that long before answering even when data arrives, which would put ~0.4-0.75 s of latency on every
record. Apache Kafka answers a fetch as soon as data arrives, so a short wait costs it only a few more
empty fetches per second.
"""

from __future__ import annotations

from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

FETCH_MAX_WAIT_MS = 5


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it builds its fetcher, so setting it here takes effect.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class ShortFetchApp(faust.App):
    """``faust.App`` with a short consumer fetch wait (see module docstring)."""

    def _new_transport(self) -> faust_aiokafka.Transport:
        return _Transport(self.conf.broker_consumer, self)
