"""The private faust/aiokafka touch points still exist as read, and the worker's Kafka
consumer gets fileserver's fetch batching (no broker needed: the consumer is built, not
started; the e2e tests run it against Apache Kafka)."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import faust
from aiokafka import AIOKafkaConsumer
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.tuples import Message

from fileserver import faust_private
from fileserver.settings import Settings
from fileserver.worker import FileserverApp


async def _worker_consumer(app: FileserverApp) -> object:
    consumer = app.consumer
    assert isinstance(consumer, faust_private.Consumer)
    thread = consumer._thread
    assert isinstance(thread, faust_private.ConsumerThread)
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


def test_the_installed_versions_are_the_ones_the_touch_points_were_read_from() -> None:
    installed = {name: version(name) for name in faust_private.READ_FROM}
    assert installed == faust_private.READ_FROM, (
        "faust or aiokafka changed: re-read every touch point listed in "
        "fileserver/faust_private.py, then update READ_FROM"
    )


async def test_every_private_touch_point_exists_with_the_signature_read() -> None:
    wait_empty = inspect.signature(faust.App._consumer_wait_empty)
    assert list(wait_empty.parameters) == ["self", "consumer", "logger"]
    assert list(inspect.signature(faust.App._new_transport).parameters) == ["self"]
    thread = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
    assert list(inspect.signature(thread).parameters) == ["self", "transport"]
    assert hasattr(faust_aiokafka.Consumer, "_new_consumer_thread")
    consumer = AIOKafkaConsumer(fetch_min_bytes=7, fetch_max_wait_ms=9)
    assert (consumer._fetch_min_bytes, consumer._fetch_max_wait_ms) == (7, 9)
    assert "acked" in Message.__slots__
    # faust's wait_empty drops a message from its wait once `acked` is set (touch point 6)
    assert "message.acked" in inspect.getsource(FaustConsumer._clean_unacked_messages)


def test_a_paused_worker_keeps_its_group_membership() -> None:
    """Intake pauses on purpose (an outage, a full window) and faust then stops polling;
    past the poll interval aiokafka would leave the group. The worker's interval is
    Kafka's maximum, so only the heartbeat (session timeout) decides membership."""
    from fileserver.worker import MAX_POLL_INTERVAL_S, build_app

    app = build_app(Settings(metrics_port=0, allowed_sources=("127.0.0.1",)))
    assert MAX_POLL_INTERVAL_S == (2**31 - 1) / 1000
    assert app.conf.broker_max_poll_interval == MAX_POLL_INTERVAL_S
    assert app.conf.broker_session_timeout == Settings().session_timeout_s


def test_the_public_hooks_of_static_membership_and_the_rebalance_log_exist() -> None:
    """Not private, but what an upgrade must keep: the setting, how faust hands it to
    aiokafka, the two signals and the generation attribute (see faust_private's notes)."""
    from faust.types import AppT

    app = FileserverApp("fileserver-unit", broker="kafka://127.0.0.1:9")
    assert app.conf.consumer_group_instance_id is None
    create = inspect.getsource(faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer)
    assert "group_instance_id=conf.consumer_group_instance_id" in create
    assert "group_instance_id" in inspect.signature(AIOKafkaConsumer).parameters
    assert hasattr(app.on_partitions_assigned, "connect")
    assert hasattr(app.on_partitions_revoked, "connect")
    assert AppT.consumer_generation_id == 0
    assert "app.consumer_generation_id = generation" in inspect.getsource(
        faust_aiokafka.ConsumerRebalanceListener.on_partitions_assigned
    )
