"""The worker's Kafka consumer gets fileserver's fetch batching (no broker needed: the
consumer is built, not started; the e2e tests run it against Apache Kafka)."""

from __future__ import annotations

from fileserver import faust_transport
from fileserver.settings import Settings
from fileserver.worker import FileserverApp


async def _worker_consumer(app: FileserverApp) -> object:
    consumer = app.consumer
    assert isinstance(consumer, faust_transport.Consumer)
    thread = consumer._thread
    assert isinstance(thread, faust_transport.ConsumerThread)
    return thread._create_worker_consumer(app.transport)


async def test_the_settings_reach_the_aiokafka_consumer() -> None:
    app = FileserverApp("fileserver-unit", broker="kafka://127.0.0.1:9")
    app.fetch_batching = (65536, 20)
    aio = await _worker_consumer(app)
    assert (aio._fetch_min_bytes, aio._fetch_max_wait_ms) == (65536, 20)  # type: ignore[attr-defined]


async def test_without_settings_faust_s_own_values_stay() -> None:
    app = FileserverApp("fileserver-unit", broker="kafka://127.0.0.1:9")
    aio = await _worker_consumer(app)
    assert (aio._fetch_min_bytes, aio._fetch_max_wait_ms) == (1, 1500)  # type: ignore[attr-defined]


def test_the_defaults_batch_fetches() -> None:
    s = Settings()
    assert (s.kafka_fetch_min_bytes, s.kafka_fetch_max_wait_ms) == (65536, 20)
