"""A real worker with its analysis children (FILESERVER_ANALYSIS_PROCESSES): the rows get
their analysis from the children, and no child outlives the worker, stopped by SIGTERM or
killed by SIGKILL."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from fileserver.analysis import analyse
from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.helpers import count, query, stop_process, tail, wait_until
from tests.integration.test_servers import alive, wait_gone


def children_of(pid: int) -> list[int]:
    """The analysis children of process ``pid`` (not zombies)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"fileserver.analysis_child" in cmdline:
            out.append(int(stat.parent.name))
    return [p for p in out if alive(p)]


def _publish(stack: StackConfig, server: SampleServer, prefix: str, n: int) -> dict[str, bytes]:
    """``n`` bursts served by ``server`` and their events published: URL -> bytes."""
    paths = {
        f"/{prefix}/room_1_user_{i}_{1569569600 + i}.mp3": make_mp3(
            1.0 + i % 3, freq_hz=200 + 37 * i
        )
        for i in range(n)
    }
    server.files.update(paths)
    events = [talk_event(server.url(p), timestamp=1569569600 + i) for i, p in enumerate(paths)]
    asyncio.run(publish(stack.kafka_bootstrap, stack.topic, events))
    return {server.url(p): data for p, data in paths.items()}


def test_the_children_analyse_and_end_with_the_worker(
    kafka_stack: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack, srv = kafka_stack, sample_server
    log = tmp_path / "worker.log"
    files = _publish(stack, srv, "a", 12)
    worker = start_worker(stack, log_path=log, extra_env={"FILESERVER_ANALYSIS_PROCESSES": "2"})
    try:
        wait_until(
            lambda: count(stack.database_url, "recordings") == len(files),
            timeout=120,
            what=f"{len(files)} rows\n{tail(log)}",
        )
        children = children_of(worker.pid)
        assert 1 <= len(children) <= 2, tail(log)
    finally:
        assert stop_process(worker) == 0, tail(log)
    assert all(wait_gone(p, 10) for p in children), "a child outlived the stopped worker"
    rows = query(
        stack.database_url,
        "SELECT source_url, peak_dbfs, rms_dbfs, speech_ratio, leading_silence_ms, "
        "trailing_silence_ms, clipped_ratio, empty FROM recordings",
    )
    for row in rows:
        a = analyse(files[row.source_url])
        assert (row.peak_dbfs, row.rms_dbfs, row.speech_ratio, row.empty) == (
            a.peak_dbfs,
            a.rms_dbfs,
            a.speech_ratio,
            a.empty,
        )
    assert "analysis child" not in log.read_text(), tail(log)  # none died, none was killed

    # SIGKILL: no aclose runs; the children end with the worker all the same.
    again = stack.with_names(group_id=stack.group_id + "-kill")
    worker = start_worker(again, log_path=log)
    try:
        more = _publish(again, srv, "b", 4)
        wait_until(
            lambda: count(stack.database_url, "recordings") == len(files) + len(more),
            timeout=120,
            what=f"{len(more)} more rows\n{tail(log)}",
        )
        children = children_of(worker.pid)
        assert len(children) == 1, tail(log)  # the default: one
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert all(wait_gone(p, 10) for p in children), "a child outlived the killed worker"
