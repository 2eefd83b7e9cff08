"""FILESERVER_GROUP_INSTANCE_ID (static membership, KIP-345) reaches aiokafka, and every
assignment and revocation is logged at INFO (no broker: the consumer is built, not
started; tests/e2e/test_static_membership.py runs it against Apache Kafka)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from faust.types import TP

from fileserver import faust_private
from fileserver.errors import ConfigError
from fileserver.logs import JsonFormatter
from fileserver.settings import Settings
from fileserver.worker import build_app, partitions_text


def settings(**env: str) -> Settings:
    base = {"FILESERVER_METRICS_PORT": "0", "FILESERVER_ALLOWED_SOURCES": "127.0.0.1"}
    return Settings.from_env({**base, **env})


def test_unset_is_dynamic_membership() -> None:
    assert Settings().group_instance_id is None
    assert settings(FILESERVER_GROUP_INSTANCE_ID="  ").group_instance_id is None


def test_a_pod_name_is_an_instance_id() -> None:
    s = settings(FILESERVER_GROUP_INSTANCE_ID="fileserver-worker-0")
    assert s.group_instance_id == "fileserver-worker-0"
    assert s.redacted()["group_instance_id"] == "fileserver-worker-0"


@pytest.mark.parametrize("bad", ["a b", "worker/0", ".", "..", "x" * 250, "wörker"])
def test_an_id_kafka_would_refuse_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="FILESERVER_GROUP_INSTANCE_ID"):
        settings(FILESERVER_GROUP_INSTANCE_ID=bad)


async def _aiokafka_consumer(s: Settings) -> Any:
    app = build_app(s)
    thread = app.consumer._thread
    assert isinstance(thread, faust_private.ConsumerThread)
    return app, thread._create_worker_consumer(app.transport)


async def test_the_id_reaches_aiokafka_as_group_instance_id() -> None:
    app, aio = await _aiokafka_consumer(settings(FILESERVER_GROUP_INSTANCE_ID="w-1"))
    assert app.conf.consumer_group_instance_id == "w-1"
    assert aio._group_instance_id == "w-1"  # sent in JoinGroup, SyncGroup, Heartbeat


async def test_without_an_id_the_consumer_is_a_dynamic_member() -> None:
    app, aio = await _aiokafka_consumer(settings())
    assert app.conf.consumer_group_instance_id is None
    assert aio._group_instance_id is None


def test_partitions_are_named_by_topic_in_order() -> None:
    tps = {TP("events", 2), TP("events", 0), TP("dlq", 1)}
    assert partitions_text(tps) == "dlq[1] events[0,2]"
    assert partitions_text(set()) == "none"


async def test_assignment_and_revocation_are_logged_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = build_app(settings(FILESERVER_GROUP_INSTANCE_ID="w-1"))
    app.consumer_generation_id = 7  # faust sets it before it sends the signal
    caplog.set_level(logging.INFO, logger="fileserver.worker")
    await app.on_partitions_revoked.send(set())  # the first join: nothing revoked
    await app.on_partitions_assigned.send({TP("events", 1), TP("events", 0)})
    await app.on_partitions_revoked.send({TP("events", 1)})
    records = [r for r in caplog.records if hasattr(r, "fields")]
    assert [r.getMessage() for r in records] == [
        "partitions assigned (generation 7): events[0,1]",
        "partitions revoked: events[1]",
    ]
    assert all(r.levelno == logging.INFO for r in records)
    doc = json.loads(JsonFormatter().format(records[0]))
    assert doc["rebalance"] == "assigned" and doc["generation"] == 7
    assert doc["partitions"] == ["events/0", "events/1"]
    assert doc["group_instance_id"] == "w-1"
    doc = json.loads(JsonFormatter().format(records[1]))
    assert (doc["rebalance"], doc["partitions"]) == ("revoked", ["events/1"])
