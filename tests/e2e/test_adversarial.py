"""Breaks found by an adversarial review, kept as regression tests with real worker
processes (Apache Kafka, SeaweedFS, Postgres, Toxiproxy). Each test asserts the promise
and failed on the code before its fix.
"""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.conftest import FaultyStack
from tests.helpers import (
    committed_offsets,
    count,
    group_members,
    query,
    stop_process,
    tail,
    wait_until,
)


def _members(stack: StackConfig) -> int:
    return asyncio.run(group_members(stack.kafka_bootstrap, stack.group_id))


def _committed(stack: StackConfig) -> dict[int, int]:
    return asyncio.run(committed_offsets(stack.kafka_bootstrap, stack.group_id, stack.topic))


def _events(srv: SampleServer, tag: str, partitions: int, per_partition: int) -> list[list[Any]]:
    clip = make_mp3(0.3)
    out = []
    for p in range(partitions):
        events = []
        for i in range(per_partition):
            path = f"/{tag}/room_{p}_user_{i}_{1569569600 + i}.mp3"
            srv.files[path] = clip
            events.append(talk_event(srv.url(path), uid=i, grp_id=p, timestamp=1569569600 + i))
        out.append(events)
    return out


def _publish(stack: StackConfig, by_partition: list[list[Any]]) -> int:
    for p, events in enumerate(by_partition):
        asyncio.run(publish(stack.kafka_bootstrap, stack.topic, events, partition=p))
    return sum(len(e) for e in by_partition)


def test_a_postgres_outage_across_a_rebalance_does_not_stall_the_worker(
    faulty_stack_3p: FaultyStack, sample_server: SampleServer, tmp_path: Path
) -> None:
    """Postgres goes down while worker A has events in flight (A pauses intake and its
    events retry). Worker B joins: the rebalance's grace ends before Postgres is back,
    so A abandons its retrying events. Postgres comes back, B leaves, A owns every
    partition again. Promise: nothing stuck, every event ends as a row.

    Before ``Health.trying`` A never processed another event: health was cleared only by
    a successful attempt, every event first waited for ``health.wait_ok()``, and the
    events that were retrying (the only ones that could succeed) had been cancelled.
    """
    faulty = faulty_stack_3p
    direct, srv = faulty.direct, sample_server
    env = {
        "FILESERVER_SHUTDOWN_GRACE_S": "2",
        "FILESERVER_CONNECT_TIMEOUT_S": "2",
        "FILESERVER_DB_STATEMENT_TIMEOUT_S": "3",
    }
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    first = _events(srv, "before", 3, 3)
    during = _events(srv, "during", 3, 3)
    after = _events(srv, "after", 3, 5)
    total = _publish(direct, first)
    a = start_worker(faulty.config, log_path=log_a, extra_env=env)
    b = None
    try:
        wait_until(
            lambda: count(direct.database_url, "recordings") == total,
            timeout=120,
            what=f"A ingests the first events\n{tail(log_a)}",
        )
        faulty.postgres.disable()  # Postgres refuses A's connections
        total += _publish(direct, during)
        wait_until(
            lambda: "pausing intake: postgres" in log_a.read_text(),
            timeout=60,
            what=f"A notices the outage\n{tail(log_a)}",
        )
        # B joins (straight to Postgres: it could not start through the dead proxy)
        b = start_worker(direct, log_path=log_b, extra_env=env)
        wait_until(lambda: _members(direct) == 2, timeout=90, what=f"B joined\n{tail(log_b)}")
        time.sleep(4)  # past A's 2 s grace: its retrying events are abandoned
        faulty.postgres.enable()  # the outage ends
        assert stop_process(b) == 0, tail(log_b)  # B leaves: A owns every partition
        b = None
        wait_until(lambda: _members(direct) == 1, timeout=90, what="B left")
        total += _publish(direct, after)
        try:
            wait_until(
                lambda: count(direct.database_url, "recordings") == total,
                timeout=90,
                what="every event ingested once Postgres is back",
            )
        except AssertionError:
            rows = count(direct.database_url, "recordings")
            raise AssertionError(
                f"A stalled for good: {rows}/{total} rows 90 s after Postgres came back; "
                f"committed {_committed(direct)}; A resumed intake: "
                f"{'resuming intake' in log_a.read_text()}\n{tail(log_a, 25)}"
            ) from None
    finally:
        if b is not None:
            stop_process(b)
        stop_process(a, timeout=20)
        faulty.postgres.enable()


def test_a_dead_letter_redelivered_after_the_source_recovers_gets_no_second_row(
    kafka_stack: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    """Offset 0 hangs at its source; offset 1's source answers 503 for longer than
    FILESERVER_SOURCE_RETRY_S, so offset 1 is dead-lettered (failure row durable) but
    cannot be committed behind offset 0. SIGTERM: the grace ends, nothing past offset 0
    is committed (correct). The sources recover; the worker restarts and offsets 0 and 1
    are redelivered. Promise: offset 1 ends as exactly one row.

    Before ``Ingestor.already_done`` looked at ``ingest_failures`` too, the redelivered
    offset 1 was ingested again and ended with a ``recordings`` row AND its
    ``ingest_failures`` row.
    """
    stack, srv = kafka_stack, sample_server
    hang_path = "/hang/room_1_user_0_1569569600.mp3"
    flaky_path = "/flaky/room_1_user_1_1569569601.mp3"
    srv.files[hang_path] = make_mp3(0.5)
    srv.files[flaky_path] = make_mp3(0.5, freq_hz=300)
    fixed = threading.Event()

    def hook(req: BaseHTTPRequestHandler) -> bool:
        if fixed.is_set():
            return False
        if req.path == hang_path:
            fixed.wait(timeout=60)
            return True  # drop the connection without an answer
        if req.path == flaky_path:
            req.send_response(503)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return True
        return False

    srv.hooks.append(hook)
    records = [
        talk_event(srv.url(hang_path), uid="0", timestamp=1569569600),
        talk_event(srv.url(flaky_path), uid="1", timestamp=1569569601),
    ]
    asyncio.run(publish(stack.kafka_bootstrap, stack.topic, records))
    env = {
        "FILESERVER_SOURCE_RETRY_S": "2",
        "FILESERVER_FETCH_TIMEOUT_S": "120",
        "FILESERVER_SHUTDOWN_GRACE_S": "1",
    }
    log = tmp_path / "worker.log"
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: count(stack.database_url, "ingest_failures") == 1,
            timeout=90,
            what=f"offset 1 dead-lettered\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    assert _committed(stack).get(0, 0) == 0, "nothing past the in-flight offset 0"
    fixed.set()  # both sources recover

    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: _committed(stack).get(0) == 2,
            timeout=90,
            what=f"both offsets committed after the restart\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    rows = query(stack.database_url, "SELECT kafka_offset FROM recordings ORDER BY 1")
    failures = query(stack.database_url, "SELECT kafka_offset, reason FROM ingest_failures")
    per_offset = {
        off: sum(r[0] == off for r in rows) + sum(f[0] == off for f in failures) for off in (0, 1)
    }
    assert per_offset == {0: 1, 1: 1}, (
        f"rows per offset {per_offset}: recordings {[r[0] for r in rows]}, "
        f"ingest_failures {[tuple(f) for f in failures]}"
    )
