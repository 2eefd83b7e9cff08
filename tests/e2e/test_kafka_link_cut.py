"""The broker link cut for longer than the session timeout (Toxiproxy), with slow downloads
and dead letters in flight: an attack of the second adversarial review that held, kept as
a regression test with a real worker process."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.conftest import FaultyStack
from tests.helpers import committed_offsets, count, query, stop_process, tail, wait_until


def _committed(stack: StackConfig) -> dict[int, int]:
    return asyncio.run(committed_offsets(stack.kafka_bootstrap, stack.group_id, stack.topic))


def test_a_20s_kafka_link_cut_with_events_in_flight_loses_nothing_and_does_not_stall(
    faulty_stack: FaultyStack, sample_server: SampleServer, tmp_path: Path
) -> None:
    """The worker's link to the broker is cut for 20 s (longer than its 6 s session
    timeout) while slow downloads and dead letters are in flight, then comes back.
    Promise: every event ends as exactly one row, the offsets are committed to the end,
    and the worker keeps working (it neither dies nor stalls)."""
    faulty, srv = faulty_stack, sample_server
    direct = faulty.direct
    clip = make_mp3(0.3)

    def slow(req: BaseHTTPRequestHandler) -> bool:
        if req.path.startswith("/slow/"):
            time.sleep(1.5)
        return False  # then serve normally (404 for the missing ones)

    srv.hooks.append(slow)
    events: list[Any] = []
    missing = 0
    for i in range(40):
        path = f"/slow/room_1_user_{i}_{1569569600 + i}.mp3"
        if i % 10 == 7:
            missing += 1  # a 404: a dead letter that needs the broker
        else:
            srv.files[path] = clip
        events.append(talk_event(srv.url(path), uid=i, timestamp=1569569600 + i))
    asyncio.run(publish(direct.kafka_bootstrap, direct.topic, events))
    env = {
        "FILESERVER_SESSION_TIMEOUT_S": "6",
        "FILESERVER_SHUTDOWN_GRACE_S": "3",
        "FILESERVER_CONCURRENCY": "4",
        "FILESERVER_COMMIT_INTERVAL_S": "1",
    }
    log = tmp_path / "worker.log"
    worker = start_worker(faulty.config, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: count(direct.database_url, "recordings") >= 5,
            timeout=120,
            what=f"the first rows\n{tail(log)}",
        )
        faulty.kafka.disable()
        time.sleep(20)
        faulty.kafka.enable()
        total = len(events)
        try:
            wait_until(
                lambda: (
                    count(direct.database_url, "recordings")
                    + count(direct.database_url, "ingest_failures")
                    >= total
                    and _committed(direct).get(0) == total
                ),
                timeout=150,
                what="every event has an outcome and is committed",
            )
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; rows {count(direct.database_url, 'recordings')}, failures "
                f"{count(direct.database_url, 'ingest_failures')}, committed "
                f"{_committed(direct)}, worker alive {worker.poll() is None}\n{tail(log, 60)}"
            ) from None
        assert worker.poll() is None, f"the worker died after the link came back\n{tail(log)}"
    finally:
        faulty.kafka.enable()
        code = stop_process(worker, timeout=60)
    rows = [r[0] for r in query(direct.database_url, "SELECT kafka_offset FROM recordings")]
    fails = [r[0] for r in query(direct.database_url, "SELECT kafka_offset FROM ingest_failures")]
    per = Counter(rows) + Counter(fails)
    assert sorted(per) == list(range(total)) and set(per.values()) == {1}, per
    assert len(fails) == missing
    assert code == 0, tail(log)
