"""fileserver.analyzer with real child processes (``python -m fileserver.analysis_child``,
no fakes): the results are the in-process ones, a child that dies or hangs fails only the
burst it was working on, at most ``processes * PIPELINE_DEPTH`` bursts are in flight, a
cancelled analysis does not put the replies out of step, and no child outlives the
analyzer or the worker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import numpy as np
import pytest

import fileserver.analyzer as analyzer_module
from fileserver.analysis import analyse
from fileserver.analysis_child import HANG_MARKER_ENV
from fileserver.analyzer import PIPELINE_DEPTH, Analyzer, Outcome
from tests.integration.test_servers import alive, wait_gone
from tests.unit.test_analysis import mp3, tone

pytestmark = pytest.mark.slow

HANG = b"HANG-THE-CHILD"


def clips() -> list[bytes]:
    """Bursts that measure differently (a reply given to the wrong request shows)."""
    speechy = tone(2.0) * (np.sin(np.linspace(0, 40, 32000)) > 0)
    return [
        mp3(tone(1.0, amplitude=2000)),
        mp3(tone(3.0, amplitude=20000, hz=440)),
        mp3(speechy),
        mp3(np.zeros(16000)),
        mp3(tone(2.5, amplitude=32767, hz=300)),
    ]


async def gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Whether every one of ``pids`` ends (or is a zombie) within ``timeout``."""
    return all(await asyncio.gather(*(asyncio.to_thread(wait_gone, p, timeout) for p in pids)))


async def run_all(analyzer: Analyzer, bursts: list[bytes]) -> list[Outcome]:
    return list(
        await asyncio.gather(*(analyzer.run(b, len(b), f"clip{i}") for i, b in enumerate(bursts)))
    )


@pytest.mark.parametrize("processes", [1, 2])
async def test_children_measure_what_analyse_measures(processes: int, tmp_path: Path) -> None:
    bursts = clips() * 4
    analyzer = Analyzer(processes=processes)
    try:
        outcomes = await run_all(analyzer, bursts)
        spooled = tmp_path / "spooled.mp3"
        spooled.write_bytes(bursts[2])
        from_file = await analyzer.run(spooled, spooled.stat().st_size, "file", expected_ms=2000)
        junk = await analyzer.run(b"junk" * 100, 400, "junk")
        assert len(analyzer.pids()) == processes
    finally:
        await analyzer.aclose()
    assert [o.analysis for o in outcomes] == [analyse(b) for b in bursts]
    assert {o.result for o in outcomes} == {"analysed"}
    assert all(0 < o.cpu_s < 1 for o in outcomes)  # the child's CPU, for the metric
    assert from_file.analysis == analyse(spooled, expected_ms=2000)
    assert (junk.result, junk.analysis) == ("failed", None)


async def test_large_recordings_go_through_the_pipe_one_frame_at_a_time() -> None:
    """Frames larger than the pipe's buffer (64 KiB): the writer sends the next one only
    once the last has gone in, and every reply still matches its request."""
    long = [mp3(tone(s, amplitude=1000 * s, hz=300 + s)) for s in (200.0, 230.0, 260.0)]
    assert min(len(b) for b in long) > 512 * 1024
    bursts = [*long, *clips()] * 2
    analyzer = Analyzer(processes=1)
    try:
        outcomes = await run_all(analyzer, bursts)
    finally:
        await analyzer.aclose()
    assert [o.analysis for o in outcomes] == [analyse(b) for b in bursts]


def test_the_child_imports_only_what_the_analysis_needs() -> None:
    """Not faust, SQLAlchemy, boto3 or the HTTP clients: its start and its RSS stay small."""
    heavy = ("faust", "sqlalchemy", "boto3", "botocore", "aiohttp", "aiokafka", "httpx")
    code = (
        "import sys, fileserver.analysis_child, numpy, miniaudio, webrtcvad; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


async def test_a_killed_child_fails_its_head_only_and_the_queue_goes_to_a_new_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(HANG_MARKER_ENV, HANG.decode())
    analyzer = Analyzer(processes=1)
    bursts = clips()[:3]
    try:
        await run_all(analyzer, bursts[:1])  # started
        (pid,) = analyzer.pids()
        head = asyncio.ensure_future(analyzer.run(HANG, len(HANG), "the head"))
        await asyncio.sleep(0.2)
        rest = asyncio.ensure_future(run_all(analyzer, bursts))
        await asyncio.sleep(0.2)  # all queued behind the head, which never returns
        assert not head.done() and not rest.done()
        os.kill(pid, signal.SIGKILL)
        failed = await asyncio.wait_for(head, 10)
        outcomes = await asyncio.wait_for(rest, 30)
        assert analyzer.pids() and analyzer.pids() != [pid]
    finally:
        await analyzer.aclose()
    assert (failed.result, failed.analysis) == ("failed", None)
    assert [o.analysis for o in outcomes] == [analyse(b) for b in bursts]
    assert f"analysis child pid {pid} was killed by SIGKILL while analysing the head" in caplog.text
    assert f"{len(bursts)} queued analyses go to a new child" in caplog.text


async def test_a_child_that_hangs_is_killed_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(HANG_MARKER_ENV, HANG.decode())
    analyzer = Analyzer(processes=1, deadline_s=3.0)
    bursts = clips()[:2]
    try:
        started = time.monotonic()
        hung, *outcomes = await asyncio.wait_for(
            asyncio.gather(
                analyzer.run(HANG, len(HANG), "the hang"),
                *(analyzer.run(b, len(b), "after") for b in bursts),
            ),
            30,
        )
        took = time.monotonic() - started
    finally:
        await analyzer.aclose()
    assert hung.result == "failed" and 3.0 <= took < 20
    assert [o.analysis for o in outcomes] == [analyse(b) for b in bursts]
    assert "was killed after 3 s on one analysis (the deadline) while analysing the hang" in (
        caplog.text
    )


async def test_at_most_depth_bursts_are_in_flight_per_child() -> None:
    analyzer = Analyzer(processes=2)
    bursts = clips() * (PIPELINE_DEPTH // 2 + 8)
    peak_total = peak_one = 0
    pids: set[int] = set()
    done = False

    async def sample() -> None:
        nonlocal peak_total, peak_one
        assert analyzer._pool is not None
        while not done:
            queues = [len(c.queue) for c in analyzer._pool.children]
            peak_total, peak_one = max(peak_total, sum(queues)), max(peak_one, *queues)
            pids.update(analyzer.pids())
            await asyncio.sleep(0)

    sampler = asyncio.ensure_future(sample())
    try:
        outcomes = await run_all(analyzer, bursts)
    finally:
        done = True
        await sampler
        await analyzer.aclose()
    assert {o.result for o in outcomes} == {"analysed"}
    assert peak_one == PIPELINE_DEPTH and PIPELINE_DEPTH < peak_total <= 2 * PIPELINE_DEPTH
    assert len(pids) == 2


async def test_a_cancelled_analysis_leaves_the_replies_in_step() -> None:
    """The worker fences events on a rebalance: their analyses are cancelled while the
    child works on them. The late replies are dropped, the child stays, the slots free."""
    analyzer = Analyzer(processes=1)
    long = mp3(tone(60.0, amplitude=3000))
    bursts = clips()
    try:
        await run_all(analyzer, bursts[:1])
        (pid,) = analyzer.pids()
        for delay in (0.0, 0.001, 0.01):
            cancelled = [
                asyncio.ensure_future(analyzer.run(long, len(long), "x")) for _ in range(3)
            ]
            await asyncio.sleep(delay)
            for task in cancelled:
                task.cancel()
            outcomes = await run_all(analyzer, bursts)
            assert [o.analysis for o in outcomes] == [analyse(b) for b in bursts]
        assert analyzer.pids() == [pid]
        pool = analyzer._pool
        assert pool is not None and pool._slots is not None
        await asyncio.sleep(0.5)  # the cancelled ones' replies came back meanwhile
        assert pool._slots._value == PIPELINE_DEPTH
        assert not pool.children[0].queue
    finally:
        await analyzer.aclose()


async def test_aclose_leaves_no_child_even_a_hung_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HANG_MARKER_ENV, HANG.decode())
    analyzer = Analyzer(processes=2)
    await run_all(analyzer, clips()[:4])
    hung = asyncio.ensure_future(analyzer.run(HANG, len(HANG), "hang"))
    await asyncio.sleep(0.2)
    pids = analyzer.pids()
    assert len(pids) == 2
    started = time.monotonic()
    await analyzer.aclose()
    assert time.monotonic() - started < 10
    assert (await asyncio.wait_for(hung, 5)).result == "failed"
    assert await gone(pids)
    assert analyzer.pids() == []
    assert analyzer._pool is not None
    tasks = [t for c in analyzer._pool.children for t in (c.reader, c.writer) if t is not None]
    assert len(tasks) == 4 and all(t.done() for t in tasks)  # none left pending on the loop
    data = clips()[0]
    assert (await analyzer.run(data, len(data), "after")).result == "failed"
    await analyzer.aclose()  # twice is fine


async def test_a_cancelled_runtime_leaves_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """The analyzer on an exit stack (as open_runtime registers it), the task cancelled
    in the middle of analyses (the worker stopping)."""
    monkeypatch.setenv(HANG_MARKER_ENV, HANG.decode())
    pids: list[int] = []
    ready = asyncio.Event()

    async def worker() -> None:
        async with AsyncExitStack() as stack:
            analyzer = Analyzer(processes=2)
            stack.push_async_callback(analyzer.aclose)
            await run_all(analyzer, clips()[:2])
            pids.extend(analyzer.pids())
            ready.set()
            await asyncio.gather(
                analyzer.run(HANG, len(HANG), "hang"), run_all(analyzer, clips() * 4)
            )

    task = asyncio.ensure_future(worker())
    await asyncio.wait_for(ready.wait(), 30)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(pids) == 2 and await gone(pids)


WORKER = """
import asyncio, sys
from fileserver.analyzer import Analyzer
data = open(sys.argv[1], "rb").read()
async def main():
    a = Analyzer(processes=2)
    await asyncio.gather(*(a.run(data, len(data), "x") for _ in range(4)))
    hang = b"HANG-THE-CHILD"
    task = asyncio.ensure_future(a.run(hang, len(hang), "hang"))
    await asyncio.sleep(0.3)
    print(*a.pids(), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_a_killed_worker_leaves_no_child(tmp_path: Path) -> None:
    """SIGKILL of the worker: no aclose runs. The idle child ends on its closed stdin, the
    one stuck in the decoder is killed with its parent (Linux: PR_SET_PDEATHSIG)."""
    clip = tmp_path / "clip.mp3"
    clip.write_bytes(clips()[1])
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(clip)],
        stdout=subprocess.PIPE,
        env={**os.environ, HANG_MARKER_ENV: HANG.decode()},
    )
    try:
        assert worker.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 60)
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        worker.kill()
        worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
    assert await gone(pids)


async def test_children_that_cannot_start_fail_analyses_at_once_and_back_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every child exits before its first reply (a broken image, a forbidden exec): each
    analysis fails, none waits or raises, an ERROR names the setting, and children are
    tried again only after a backoff."""
    starts = 0
    real = analyzer_module.child_command

    def broken() -> list[str]:
        nonlocal starts
        starts += 1
        return [sys.executable, "-c", "import sys; sys.exit(3)"]

    monkeypatch.setattr(analyzer_module, "child_command", broken)
    analyzer = Analyzer(processes=1)
    data = clips()[0]
    caplog.set_level(logging.WARNING, "fileserver.analyzer")
    try:
        started = time.monotonic()
        for _ in range(3):
            outcomes = await asyncio.wait_for(run_all(analyzer, [data] * 10), 30)
            assert {o.result for o in outcomes} == {"failed"}
        assert time.monotonic() - started < 10
        assert starts <= 3  # two early deaths, then the backoff: no fork storm
        assert "analysis children cannot start" in caplog.text
        assert "FILESERVER_ANALYSIS_PROCESSES=0" in caplog.text
        assert "exited with status 3" in caplog.text
        monkeypatch.setattr(analyzer_module, "child_command", real)
        pool = analyzer._pool
        assert pool is not None
        pool.children[0].retry_at = 0.0  # the backoff over: a working child is used again
        (outcome,) = await run_all(analyzer, [data])
        assert outcome.analysis == analyse(data)
    finally:
        await analyzer.aclose()


async def test_an_exec_that_fails_is_an_analysis_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(analyzer_module, "child_command", lambda: ["/nonexistent/python"])
    analyzer = Analyzer(processes=2)
    data = clips()[0]
    try:
        outcomes = await asyncio.wait_for(run_all(analyzer, [data] * 8), 10)
    finally:
        await analyzer.aclose()
    assert {o.result for o in outcomes} == {"failed"}
    assert "FILESERVER_ANALYSIS_PROCESSES=0" in caplog.text
