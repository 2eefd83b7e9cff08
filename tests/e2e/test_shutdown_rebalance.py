"""Graceful shutdown and rebalance with real worker processes on Apache Kafka.

SIGTERM drains in-flight events within the grace and commits exactly the durable
prefix; two workers in one group share a partitioned topic, and stopping one moves
its partitions to the other without loss or duplicates.
"""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.helpers import (
    committed_offsets,
    count,
    group_members,
    query,
    stop_process,
    tail,
    wait_until,
)


def _committed(stack: StackConfig) -> dict[int, int]:
    return asyncio.run(committed_offsets(stack.kafka_bootstrap, stack.group_id, stack.topic))


def test_sigterm_commits_the_durable_prefix_and_abandons_a_stuck_event(
    kafka_stack: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = kafka_stack, sample_server
    clip = make_mp3(0.5)
    stuck = "/stuck/room_1_user_0_1569569600.mp3"
    srv.files[stuck] = clip
    release = threading.Event()

    def hang(req: BaseHTTPRequestHandler) -> bool:
        if req.path == stuck and not release.is_set():
            release.wait(timeout=120)
            return True
        return False

    srv.hooks.append(hang)
    paths = [f"/ok/room_1_user_{i}_{1569569600 + i}.mp3" for i in range(1, 11)]
    for p in paths:
        srv.files[p] = clip
    # offsets 0..4 fast, 5 stuck, 6..10 fast
    order = [*paths[:5], stuck, *paths[5:]]
    asyncio.run(
        publish(stack.kafka_bootstrap, stack.topic, [talk_event(srv.url(p)) for p in order])
    )
    log = tmp_path / "worker.log"
    env = {"FILESERVER_SHUTDOWN_GRACE_S": "3", "FILESERVER_SOURCE_RETRY_S": "600"}
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: count(stack.database_url, "recordings") == 10,
            timeout=90,
            what=f"10 fast rows\n{tail(log)}",
        )
    finally:
        started = time.monotonic()
        code = stop_process(worker, timeout=60)
        took = time.monotonic() - started
    print(f"SIGTERM with one stuck event: exit {code} after {took:.1f}s (grace 3s)")
    assert code == 0, tail(log)
    assert _committed(stack).get(0) == 5, "commit must stop right before the stuck event"
    assert "left uncommitted" in log.read_text()

    release.set()
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: count(stack.database_url, "recordings") == 11,
            timeout=90,
            what=f"the stuck event after restart\n{tail(log)}",
        )
        wait_until(lambda: _committed(stack).get(0) == 11, timeout=30, what="final commit")
    finally:
        assert stop_process(worker) == 0, tail(log)
    assert srv.hits[stuck] >= 2  # tried before the restart, ingested after it
    assert all(srv.hits[p] == 1 for p in paths)  # redelivered ones were not downloaded again


def test_sigterm_lets_in_flight_events_finish_within_the_grace(
    kafka_stack: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = kafka_stack, sample_server
    clip = make_mp3(0.5)
    started = threading.Event()

    def slow(req: BaseHTTPRequestHandler) -> bool:
        started.set()
        time.sleep(1.5)  # every download takes 1.5 s
        return False

    srv.hooks.append(slow)
    paths = [f"/slow/room_1_user_{i}_{1569569600 + i}.mp3" for i in range(8)]
    for p in paths:
        srv.files[p] = clip
    asyncio.run(
        publish(stack.kafka_bootstrap, stack.topic, [talk_event(srv.url(p)) for p in paths])
    )
    log = tmp_path / "worker.log"
    worker = start_worker(stack, log_path=log, extra_env={"FILESERVER_SHUTDOWN_GRACE_S": "30"})
    assert started.wait(timeout=90), tail(log)
    code = stop_process(worker, timeout=60)  # SIGTERM while downloads are in flight
    assert code == 0, tail(log)
    rows = count(stack.database_url, "recordings")
    assert rows == len(paths), "in-flight events should finish within the grace"
    assert _committed(stack).get(0) == rows, "exactly the durable events are committed"


def test_two_workers_share_partitions_and_survive_one_stopping(
    kafka_stack_3p: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = kafka_stack_3p, sample_server
    clip = make_mp3(0.5)

    def pace(req: BaseHTTPRequestHandler) -> bool:
        time.sleep(0.05)
        return False

    srv.hooks.append(pace)
    n = 150
    paths = [f"/p/room_1_user_{i}_{1569569600 + i}.mp3" for i in range(n)]
    for p in paths:
        srv.files[p] = clip
    env = {"FILESERVER_CONCURRENCY": "4", "FILESERVER_SHUTDOWN_GRACE_S": "10"}
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_worker(stack, log_path=log_a, extra_env=env)
    b = start_worker(stack, log_path=log_b, extra_env=env)
    try:
        wait_until(
            lambda: asyncio.run(group_members(stack.kafka_bootstrap, stack.group_id)) == 2,
            timeout=120,
            what=f"both workers in the group\n{tail(log_a)}\n{tail(log_b)}",
        )
        events = [talk_event(srv.url(p)) for p in paths]
        asyncio.run(publish(stack.kafka_bootstrap, stack.topic, events[: n // 2]))
        wait_until(
            lambda: (
                count(stack.database_url, "recordings") >= n // 4
                and "ingested" in log_a.read_text()
                and "ingested" in log_b.read_text()
            ),
            timeout=120,
            what=f"progress on both workers\n{tail(log_a)}\n{tail(log_b)}",
        )
        assert stop_process(a, timeout=60) == 0, tail(log_a)  # its partitions move to b
        asyncio.run(publish(stack.kafka_bootstrap, stack.topic, events[n // 2 :]))
        wait_until(
            lambda: count(stack.database_url, "recordings") == n,
            timeout=180,
            what=f"all {n} rows on the remaining worker\n{tail(log_b)}",
        )
    finally:
        stop_process(a)
        assert stop_process(b, timeout=60) == 0, tail(log_b)
    urls = [r[0] for r in query(stack.database_url, "SELECT source_url FROM recordings")]
    assert sorted(urls) == sorted(srv.url(p) for p in paths)
    assert count(stack.database_url, "ingest_failures") == 0
    worked_a = "ingested" in log_a.read_text()
    worked_b = "ingested" in log_b.read_text()
    assert worked_a and worked_b, "both workers should have ingested events"
    committed = _committed(stack)
    assert sum(committed.values()) == n, committed
