"""faust's Kafka transport with the consumer's fetch batching set by fileserver (faust wiring).

faust builds the worker's ``AIOKafkaConsumer`` itself, with ``fetch_max_wait_ms=1500``
hard-coded and aiokafka's ``fetch_min_bytes=1``: the broker answers a fetch as soon as
one record is there. Under a steady load that is one fetch request (and response)
every few events. Measured at ~400 events/s (``python -m bench --latency-rate 400``):
the machine's CPU per event 4.1-4.4 ms with faust's values, 3.4 ms with 64 KiB / 20 ms
(worker 1.55-1.65 -> 1.25-1.32 ms); with two workers p99 402-558 -> 206-213 ms.

With ``FILESERVER_KAFKA_FETCH_MIN_BYTES`` / ``FILESERVER_KAFKA_FETCH_MAX_WAIT_MS`` the
broker holds a fetch until that many bytes are there or that long has passed: one
fetch per that many milliseconds under load, at most that much added latency when
traffic is light. The two values are set on the consumer after faust built it and
before it starts (they are read only when it starts its fetcher).
"""

from __future__ import annotations

import logging
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger(__name__)


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread; its worker consumer gets the app's fetch batching."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        batching = getattr(self.app, "fetch_batching", None)
        if batching is not None:
            # aiokafka keeps the constructor's values in these attributes until start()
            consumer._fetch_min_bytes, consumer._fetch_max_wait_ms = batching
        log.info(
            "kafka consumer: fetch_min_bytes=%s fetch_max_wait_ms=%s",
            consumer._fetch_min_bytes,
            consumer._fetch_max_wait_ms,
        )
        return consumer


class Consumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer, running :class:`ConsumerThread`."""

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    """faust's aiokafka transport with :class:`Consumer`."""

    Consumer = Consumer
