"""Nothing of a partition's old assignment commits past an unfinished event (Apache Kafka).

The loss this guards against: a gateway is down, the first events of every partition
retry while later ones finish, the window fills (``FILESERVER_MAX_PENDING``) and the
agent waits with one more event E. A rebalance or SIGTERM drains the window and
abandons the stuck events; E must then be fenced, never run and acked, or faust
commits E+1 past them and they are gone. Real worker processes, a real group; the
workers reach Kafka, S3, Postgres and the gateway through Toxiproxy.
"""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.conftest import FaultyStack, ProxiedSource
from tests.helpers import (
    committed_offsets,
    count,
    group_members,
    query,
    stop_process,
    tail,
    wait_until,
)

PARTITIONS = 3
PER_PARTITION = 300
STUCK = 10  # the head of every partition is behind the gateway that is down
ENV = {
    "FILESERVER_MAX_PENDING": "40",
    "FILESERVER_CONCURRENCY": "40",  # a retrying event keeps its slot
    "FILESERVER_SHUTDOWN_GRACE_S": "2",
    "FILESERVER_SOURCE_RETRY_S": "600",  # the stuck events retry for the whole test
}


def _committed(stack: StackConfig) -> dict[int, int]:
    return asyncio.run(committed_offsets(stack.kafka_bootstrap, stack.group_id, stack.topic))


def _members(stack: StackConfig) -> int:
    return asyncio.run(group_members(stack.kafka_bootstrap, stack.group_id))


class Gateway:
    """Paths under ``/down/`` answer 503 until :meth:`recover`."""

    def __init__(self, srv: SampleServer) -> None:
        self.up = threading.Event()
        self.refused = 0
        srv.hooks.append(self._hook)

    def _hook(self, req: BaseHTTPRequestHandler) -> bool:
        if req.path.startswith("/down/") and not self.up.is_set():
            self.refused += 1
            req.send_response(503)
            req.send_header("Content-Length", "0")
            req.send_header("Retry-After", "1")
            req.end_headers()
            return True
        return False

    def recover(self) -> None:
        self.up.set()


def _proxied(faulty: FaultyStack, srv: SampleServer) -> tuple[StackConfig, ProxiedSource]:
    """The worker's config: every dependency and the gateway through their proxies."""
    src = faulty.proxy_source(srv)
    return faulty.config.with_names(allowed_sources=(src.allowed,)), src


def _publish_heads_behind_gateway(
    stack: StackConfig, srv: SampleServer, src: ProxiedSource
) -> list[str]:
    clip = make_mp3(0.3)
    urls: list[str] = []
    for p in range(PARTITIONS):
        events = []
        for i in range(PER_PARTITION):
            prefix = "/down" if i < STUCK else "/up"
            path = f"{prefix}/room_{p}_user_{i}_{1569569600 + i}.mp3"
            srv.files[path] = clip
            events.append(talk_event(src.url(path), uid=i, grp_id=p, timestamp=1569569600 + i))
            urls.append(src.url(path))
        asyncio.run(publish(stack.kafka_bootstrap, stack.topic, events, partition=p))
    return urls


def _assert_nothing_committed_past_the_stuck_heads(stack: StackConfig, when: str) -> None:
    committed = _committed(stack)
    assert all(offset <= 0 for offset in committed.values()), (
        f"{when}: a commit passed an event still behind the gateway: {committed}"
    )


def _finish(stack: StackConfig, urls: list[str], logs: list[Path], gateway: Gateway) -> None:
    gateway.recover()
    wait_until(
        lambda: count(stack.database_url, "recordings") >= len(urls),
        timeout=240,
        what="every event ingested after the gateway recovered\n"
        + "\n".join(tail(p) for p in logs),
    )
    wait_until(
        lambda: _committed(stack) == {p: PER_PARTITION for p in range(PARTITIONS)},
        timeout=60,
        what="every partition committed to its end",
    )


def _assert_exactly_once(stack: StackConfig, urls: list[str]) -> None:
    rows = [r[0] for r in query(stack.database_url, "SELECT source_url FROM recordings")]
    failures = count(stack.database_url, "ingest_failures")
    print(
        f"events {len(urls)}, rows {len(rows)}, duplicates {len(rows) - len(set(rows))}, "
        f"dead letters {failures}"
    )
    assert sorted(rows) == sorted(urls), "rows = good events, no duplicate, none lost"
    assert failures == 0


def test_rebalances_while_a_gateway_is_down_lose_nothing(
    faulty_stack_3p: FaultyStack, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = faulty_stack_3p.direct, sample_server
    worker_config, src = _proxied(faulty_stack_3p, srv)
    gateway = Gateway(srv)
    urls = _publish_heads_behind_gateway(stack, srv, src)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_worker(worker_config, log_path=log_a, extra_env=ENV)
    b = None
    rebalances = 0
    try:
        # the window fills: the later events finish, the heads keep failing
        wait_until(
            lambda: count(stack.database_url, "recordings") >= 10,
            timeout=120,
            what=f"progress behind the stuck heads\n{tail(log_a)}",
        )
        for _ in range(2):  # join, leave, join (three rebalances)
            b = start_worker(worker_config, log_path=log_b, extra_env=ENV)
            wait_until(lambda: _members(stack) == 2, timeout=120, what="B joined")
            rebalances += 1
            _assert_nothing_committed_past_the_stuck_heads(stack, f"rebalance {rebalances}")
            if rebalances == 3:
                break
            assert stop_process(b, timeout=60) == 0, tail(log_b)
            wait_until(lambda: _members(stack) == 1, timeout=120, what="B left")
            rebalances += 1
            _assert_nothing_committed_past_the_stuck_heads(stack, f"rebalance {rebalances}")
        assert gateway.refused > 0
        _finish(stack, urls, [log_a, log_b], gateway)
        assert a.poll() is None and b is not None and b.poll() is None, "both workers alive"
    finally:
        for proc, log in ((a, log_a), (b, log_b)):
            if proc is not None:
                assert stop_process(proc, timeout=60) == 0, tail(log)
    fenced = sum(p.read_text().count("fenced ") for p in (log_a, log_b))
    print(f"rebalances {rebalances}, 503s served {gateway.refused}, events fenced {fenced}")
    _assert_exactly_once(stack, urls)


def test_sigterm_while_a_gateway_is_down_loses_nothing(
    faulty_stack_3p: FaultyStack, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = faulty_stack_3p.direct, sample_server
    worker_config, src = _proxied(faulty_stack_3p, srv)
    gateway = Gateway(srv)
    urls = _publish_heads_behind_gateway(stack, srv, src)
    log = tmp_path / "worker.log"
    for round_ in range(3):
        wanted = gateway.refused + STUCK
        worker = start_worker(worker_config, log_path=log, extra_env=ENV)
        try:
            # the stuck heads of a partition tried again, and the window full behind them
            wait_until(
                lambda: gateway.refused >= wanted,  # noqa: B023 (used within the round)
                timeout=120,
                what=f"the stuck heads retried in round {round_}\n{tail(log)}",
            )
            wait_until(
                lambda: count(stack.database_url, "recordings") >= 10,
                timeout=60,
                what=f"events behind the heads ingested\n{tail(log)}",
            )
        finally:
            assert stop_process(worker, timeout=60) == 0, tail(log)
        _assert_nothing_committed_past_the_stuck_heads(stack, f"SIGTERM {round_ + 1}")
    worker = start_worker(worker_config, log_path=log, extra_env=ENV)
    try:
        _finish(stack, urls, [log], gateway)
        assert worker.poll() is None
    finally:
        assert stop_process(worker, timeout=60) == 0, tail(log)
    print(f"SIGTERMs 3, 503s served {gateway.refused}, fenced {log.read_text().count('fenced ')}")
    _assert_exactly_once(stack, urls)
