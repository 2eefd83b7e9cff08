"""Static group membership (KIP-345) on a real Apache Kafka: a worker killed with SIGKILL
and restarted with the same FILESERVER_GROUP_INSTANCE_ID takes its partitions back at
once, in the same group generation (no rebalance), and delivery stays exact.

The session timeout (60 s) is far longer than the test waits for the restarted worker
(25 s): a dynamic member would be blocked behind its dead predecessor's session for the
whole wait, which the second test shows (the same run without an instance id).

The generation is the broker's: aiokafka reads it from the JoinGroup response and faust
hands it to the app (``consumer_generation_id``) before its ``on_partitions_assigned``
signal, which the worker logs (``partitions assigned (generation N)``). Kafka's
DescribeGroups has no generation for a classic group, so the log is where it is seen;
the admin client shows the member and its instance id.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.helpers import count, query, stop_process, tail, wait_until

SESSION_TIMEOUT_S = 60
WAIT_S = 25  # well under the session timeout: a dynamic member stays blocked throughout
PARTITIONS = 3
PER_PARTITION = 4


def rebalances(log: Path) -> list[dict[str, Any]]:
    """The worker's ``partitions assigned`` / ``partitions revoked`` JSON lines."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            doc = json.loads(line)
            if "rebalance" in doc:
                out.append(doc)
    return out


def assignments(log: Path) -> list[dict[str, Any]]:
    return [d for d in rebalances(log) if d["rebalance"] == "assigned" and d["partitions"]]


def _batch(srv: SampleServer, stack: StackConfig, tag: str, start: int) -> list[str]:
    """PER_PARTITION distinct talk events on each partition; returns their URLs."""
    urls: list[str] = []
    for p in range(PARTITIONS):
        records = []
        for i in range(PER_PARTITION):
            n = start + p * PER_PARTITION + i
            path = f"/{tag}/room_1_user_{n}_{1569569600 + n}.mp3"
            srv.files[path] = make_mp3(0.5, freq_hz=200 + 13 * n)
            urls.append(srv.url(path))
            records.append(talk_event(srv.url(path), uid=str(n), timestamp=1569569600 + n))
        asyncio.run(publish(stack.kafka_bootstrap, stack.topic, records, partition=p))
    return urls


def _slow(srv: SampleServer, prefix: str, seconds: float) -> dict[str, int]:
    """Answer every request under ``prefix`` after ``seconds``; counts the requests."""
    hits = {"n": 0}
    lock = threading.Lock()

    def hook(req: BaseHTTPRequestHandler) -> bool:
        if req.path.startswith(prefix):
            with lock:
                hits["n"] += 1
            time.sleep(seconds)
        return False

    srv.hooks.append(hook)
    return hits


async def _group(bootstrap: str, group: str) -> tuple[str, list[str]]:
    """The group's state and its members' ids, as the coordinator reports them."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    ((error, _, state, _, _, members, *_),) = response.groups
    assert error == 0, error
    return state, [m[0] for m in members]


def _kill_mid_batch(
    stack: StackConfig, srv: SampleServer, log: Path, env: dict[str, str]
) -> tuple[int, set[str], list[str]]:
    """Run a worker through one batch, kill it with SIGKILL during the next; returns the
    generation it had, the partitions it owned and every URL published."""
    first = _batch(srv, stack, "a", 0)
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: count(stack.database_url, "recordings") == len(first),
            timeout=120,
            what=f"the first batch ingested\n{tail(log)}",
        )
        (assigned,) = assignments(log)
        hits = _slow(srv, "/b/", 4.0)
        second = _batch(srv, stack, "b", 100)
        wait_until(
            lambda: hits["n"] >= 6, timeout=60, what=f"the second batch in flight\n{tail(log)}"
        )
        assert count(stack.database_url, "recordings") < len(first) + len(second)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    return int(assigned["generation"]), set(assigned["partitions"]), first + second


def _exactly_once(stack: StackConfig, urls: list[str]) -> None:
    rows = [r[0] for r in query(stack.database_url, "SELECT source_url FROM recordings")]
    assert sorted(rows) == sorted(urls), "a missing or duplicate row"
    assert count(stack.database_url, "ingest_failures") == 0


def test_a_killed_static_member_resumes_its_partitions_without_a_rebalance(
    kafka_stack_3p: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = kafka_stack_3p, sample_server
    env = {
        "FILESERVER_GROUP_INSTANCE_ID": "fileserver-worker-0",
        "FILESERVER_SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
        "FILESERVER_REBALANCE_TIMEOUT_S": str(SESSION_TIMEOUT_S),
    }
    generation, partitions, urls = _kill_mid_batch(stack, srv, tmp_path / "first.log", env)
    assert partitions == {f"{stack.topic}/{p}" for p in range(PARTITIONS)}
    rows_at_kill = count(stack.database_url, "recordings")

    log = tmp_path / "restarted.log"
    started = time.monotonic()
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        (assigned,) = wait_until(
            lambda: assignments(log), timeout=WAIT_S, what=f"the partitions back\n{tail(log)}"
        )
        back_after = time.monotonic() - started
        wait_until(
            lambda: count(stack.database_url, "recordings") == len(urls),
            timeout=max(1.0, WAIT_S - (time.monotonic() - started)),
            what=f"every event ingested within {WAIT_S}s of the restart\n{tail(log)}",
        )
        done_after = time.monotonic() - started
        # The same generation: the broker replaced the dead member by its successor and
        # gave it the same assignment; no member of the group had to rejoin.
        assert assigned["generation"] == generation
        assert set(assigned["partitions"]) == partitions
        assert assigned["group_instance_id"] == "fileserver-worker-0"
        assert not [d for d in rebalances(log) if d["rebalance"] == "revoked"]
        state, members = asyncio.run(_group(stack.kafka_bootstrap, stack.group_id))
        print(f"\ngroup after the restart: {state} {members}")
        assert state == "Stable" and len(members) == 1
    finally:
        assert stop_process(worker) == 0, tail(log)
    _exactly_once(stack, urls)
    print(
        f"\nstatic membership: generation {generation} kept; partitions back "
        f"{back_after:.1f}s after the restart, all {len(urls)} events in {done_after:.1f}s "
        f"({rows_at_kill} at the kill; session timeout {SESSION_TIMEOUT_S}s)"
    )


def test_a_killed_dynamic_member_waits_for_its_predecessors_session(
    kafka_stack_3p: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    """The control: the same kill and restart without an instance id. The restarted
    worker gets nothing for the whole wait (the group waits for the dead member until its
    session times out), then a new generation."""
    stack, srv = kafka_stack_3p, sample_server
    env = {
        "FILESERVER_SESSION_TIMEOUT_S": str(SESSION_TIMEOUT_S),
        "FILESERVER_REBALANCE_TIMEOUT_S": str(SESSION_TIMEOUT_S),
    }
    generation, partitions, urls = _kill_mid_batch(stack, srv, tmp_path / "first.log", env)
    rows_at_kill = count(stack.database_url, "recordings")

    log = tmp_path / "restarted.log"
    started = time.monotonic()
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        time.sleep(WAIT_S)
        assert not assignments(log), "a dynamic member was not blocked"
        assert count(stack.database_url, "recordings") == rows_at_kill
        (assigned,) = wait_until(
            lambda: assignments(log),
            timeout=SESSION_TIMEOUT_S + 30,
            what=f"the partitions after the session timeout\n{tail(log)}",
        )
        back_after = time.monotonic() - started
        assert assigned["generation"] > generation
        assert set(assigned["partitions"]) == partitions
        wait_until(
            lambda: count(stack.database_url, "recordings") == len(urls),
            timeout=60,
            what=f"every event ingested\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    _exactly_once(stack, urls)
    print(
        f"\ndynamic membership: partitions back {back_after:.1f}s after the restart "
        f"(generation {generation} -> {assigned['generation']}; session timeout "
        f"{SESSION_TIMEOUT_S}s)"
    )
