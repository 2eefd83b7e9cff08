"""Every place fileserver relies on faust's or aiokafka's private API, in one module.

Read from faust-streaming 0.15.3 and aiokafka 0.14.0 (pinned in pyproject.toml); a
unit test (``tests/unit/test_faust_private.py``) fails when an upgrade moves any of them,
so an upgrade is re-read here rather than discovered in production.

=====  ===============================================  ====================================
#      touch point                                      why
=====  ===============================================  ====================================
1      ``faust.App._new_transport`` (override)          install :class:`Transport`, whose
                                                        consumer batches its fetches
2      ``faust...Consumer._new_consumer_thread``        run :class:`ConsumerThread`
       (override)
3      ``AIOKafkaConsumerThread._create_worker_consumer``  set the fetch batching on the
       (override)                                       consumer faust builds
4      aiokafka ``AIOKafkaConsumer._fetch_min_bytes`` /  faust hard-codes
       ``_fetch_max_wait_ms`` (written before start)    ``fetch_max_wait_ms=1500`` and
                                                        ``fetch_min_bytes=1``
5      ``faust.App._consumer_wait_empty`` (override)    bound faust's unbounded wait for
                                                        unacked events on revocation and
                                                        shutdown with the window's drain,
                                                        whose end is the generation fence
6      ``Message.acked = True`` without                 let faust stop waiting for a fenced
       ``Consumer.ack`` (:func:`forget_event`)          or abandoned event without recording
                                                        its offset for commit
=====  ===============================================  ====================================

The fencing fix added none: the generation fence lives in fileserver's own window
(:class:`fileserver.worker.IntakeWindow`), and the poll interval is faust's public
``broker_max_poll_interval`` setting.

Static membership and the rebalance log added none either, and are guarded by the same
test because an upgrade could still move them: ``FILESERVER_GROUP_INSTANCE_ID`` is faust's
public ``consumer_group_instance_id`` setting, which faust's worker consumer passes to
``aiokafka.AIOKafkaConsumer(group_instance_id=...)``; assignments and revocations are
logged from faust's public ``App.on_partitions_assigned`` / ``on_partitions_revoked``
signals, with the generation from ``App.consumer_generation_id`` (a public attribute of
faust's ``AppT``, set before the assignment signal is sent).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger(__name__)

READ_FROM = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread; its worker consumer gets the app's fetch batching.

    faust builds the worker's ``AIOKafkaConsumer`` with ``fetch_max_wait_ms=1500`` and
    aiokafka's ``fetch_min_bytes=1``: the broker answers a fetch as soon as one record is
    there, one fetch per few events under load. ``FILESERVER_KAFKA_FETCH_MIN_BYTES`` /
    ``_MAX_WAIT_MS`` make the broker hold a fetch until that many bytes are there or that
    long has passed (read by aiokafka only when it starts its fetcher).
    """

    def _create_worker_consumer(self, transport: Any) -> Any:  # touch point 3
        consumer = super()._create_worker_consumer(transport)
        batching = getattr(self.app, "fetch_batching", None)
        if batching is not None:
            # touch point 4: aiokafka keeps the constructor's values here until start()
            consumer._fetch_min_bytes, consumer._fetch_max_wait_ms = batching
        log.info(
            "kafka consumer: fetch_min_bytes=%s fetch_max_wait_ms=%s",
            consumer._fetch_min_bytes,
            consumer._fetch_max_wait_ms,
        )
        return consumer


class Consumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer, running :class:`ConsumerThread`."""

    def _new_consumer_thread(self) -> ConsumerThread:  # touch point 2
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    """faust's aiokafka transport with :class:`Consumer`."""

    Consumer = Consumer


class Drain(Protocol):
    """What the app needs of the intake window on revocation and shutdown."""

    async def drain(self, grace_s: float) -> int: ...


class PrivateHooks(faust.App):
    """The two overrides of :class:`faust.App` (touch points 1 and 5)."""

    window: Drain | None = None
    shutdown_grace_s: float = 30.0
    fetch_batching: tuple[int, int] | None = None  # (fetch_min_bytes, fetch_max_wait_ms)

    def _new_transport(self) -> Any:  # touch point 1
        return Transport(self.conf.broker_consumer, self)

    async def _consumer_wait_empty(self, consumer: Any, logger: Any) -> None:  # point 5
        """faust waits here for every unacked event (revocation, shutdown). The window's
        drain runs beside that wait and bounds it; it always runs to its end, because its
        end is the fence of the generation (see :class:`fileserver.worker.IntakeWindow`)."""
        window = self.window
        if window is None:
            await super()._consumer_wait_empty(consumer, logger)
            return
        drain = asyncio.create_task(window.drain(self.shutdown_grace_s), name="bounded drain")
        try:
            await super()._consumer_wait_empty(consumer, logger)
        finally:
            await drain


def forget_event(event: Any) -> None:
    """Let faust stop waiting for an event without acking (committing) it (touch point 6)."""
    event.message.acked = True
