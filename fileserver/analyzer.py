"""Runs the speech analysis (:func:`fileserver.analysis.analyse`) for the pipeline.

Kept apart from :mod:`fileserver.analysis` (pure CPU work on bytes) because this is the
part with a lifecycle: where the decoding runs, how many at once, and how a burst that
cannot be analysed still becomes a row.

Where: in ``FILESERVER_ANALYSIS_PROCESSES`` long-lived child processes (default 1,
:mod:`fileserver.analysis_child`), out of the worker's GIL. In a thread of the worker the
decoder's Python read callbacks each waited for the GIL behind the busy event loop (up
to the 5 ms switch interval: ``python -m bench.analysis_gil`` measured ~1,800 decodes/s
beside an idle main thread, ~6 beside a busy one), and the worker did ~250 events/s with
the analysis on against ~800 with it off. ``0`` keeps the old mode, one analysis at a
time in a thread of the worker (for tests and platforms that forbid subprocesses).

Why children although the decoder no longer calls back into Python (the thread stopped
convoying once it did): one child still did a little better end to end, but only with a
deep queue per child (bench/README.md, "The analysis in child processes"); the worker no
longer loads numpy and miniaudio (~20 MB); and a decoder that crashes or hangs on a
hostile file takes down a child, not the worker.

The children (:class:`_Child`) never fail an event and never hang one:

* each gets up to :data:`PIPELINE_DEPTH` requests at once, answered in order, so it
  never idles waiting for the worker's busy event loop to send the next one (a writer
  task sends them one frame at a time: at most one is copied into the pipe's buffer); a
  request goes to the child with the shortest queue; at most ``processes *
  PIPELINE_DEPTH`` are in flight;
* a child that dies (killed, a crash, the OOM killer) fails the request at the head of
  its queue, the one it was working on (stored with ``NULL`` analysis columns, logged with
  the exit status or signal); the others go to a fresh child;
* a child whose head request takes longer than the deadline (:func:`deadline_for`:
  30 s + 50 ms per second of ``max_seconds``, 60 s at the default 600; an analysis takes
  ~0.2-0.5 ms of CPU per second of audio, so this is only ever a decoder that hangs) is
  killed and treated the same;
* children that cannot start (the exec fails, or two in a row end before they say they
  are ready, :data:`fileserver.analysis_child.READY`, or :data:`REQUEST_DEATHS_MAX` ready
  ones in a row end before their first reply: a decoder that crashes on everything) are
  retried after a backoff doubling from :data:`RESTART_BACKOFF_S` to
  :data:`RESTART_BACKOFF_MAX_S`; meanwhile analyses fail at once (one ERROR line naming
  ``FILESERVER_ANALYSIS_PROCESSES`` per attempt), never waiting and never raising. A
  child that was ready and ended on its first analysis was taken down by that recording
  (two such recordings in a row, the first a restarted worker sees, counted as children
  that cannot start: every burst queued behind them failed);
* a cancelled :meth:`Analyzer.run` (the worker fences events on a rebalance) leaves its
  request queued: the child answers it and the late reply is dropped, so the replies
  stay in step with the requests;
* they start with the first analysis (a child costs ~0.25 s of CPU to start, ~40 MB:
  nothing is spent by commands that never analyse); :meth:`Analyzer.aclose` (on the
  runtime's exit stack) closes their stdin, waits up to :data:`CLOSE_WAIT_S`, then kills
  them. A worker that is killed leaves none behind either: a child ends when its stdin
  closes and, on Linux, is killed with its parent (``PR_SET_PDEATHSIG``).

Their CPU is each reply's ``cpu_s`` (the child's ``process_time`` for that analysis),
counted in ``fileserver_analysis_cpu_seconds_total`` like the thread's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fileserver
from fileserver.analysis import Analysis, AnalysisConfig, AnalysisError, analyse
from fileserver.analysis_child import (
    PREFIX,
    FrameError,
    Reply,
    Request,
    decode_ready,
    decode_reply,
    encode_request,
    frame_lengths,
)

log = logging.getLogger(__name__)

#: Requests queued to one child at once. Deep, so the child always has the next one
#: while the worker's busy event loop takes its time to read a reply and send another (a
#: 9 KB burst is ~0.5 ms of the child's CPU, a turn of the loop at full load several ms;
#: 4 and 16 measured slower than the thread, bench/README.md). What it costs: a
#: cancelled request is still analysed (64 x ~0.5 ms at most), and the queue waits
#: behind a child that hangs until the deadline (as 4 would).
PIPELINE_DEPTH = 64
#: The first wait before starting a child again after two in a row ended before they
#: were ready (or the exec failed); doubled each time up to :data:`RESTART_BACKOFF_MAX_S`.
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 60.0
#: Ready children in a row that ended on their first analysis before the pool backs off
#: as for children that cannot start: not two (a recording that kills the decoder is
#: its own burst's failure, and two of them in a row failed every burst queued behind
#: them), but a bound on the starts (~0.25 s of CPU each) of a child that crashes on
#: every recording.
REQUEST_DEATHS_MAX = 8
#: How long :meth:`Analyzer.aclose` lets the children finish before it kills them.
CLOSE_WAIT_S = 2.0
#: How long a child whose stdout ended may take to exit before it is killed (its exit
#: status is what the log line reports).
EXIT_WAIT_S = 1.0
SETTING = "FILESERVER_ANALYSIS_PROCESSES"


def deadline_for(max_seconds: float) -> float:
    """How long one analysis may take in a child before the child is killed: 30 s (a
    child's start-up and a starved machine) plus 50 ms per second of audio it may decode,
    over 100x the measured 0.2-0.5 ms."""
    return 30.0 + max_seconds / 20.0


class Analyzer:
    """Runs :func:`analyse` for the pipeline off the event loop, never failing the event:
    in ``processes`` child processes (see the module's docstring), or with
    ``processes=0`` one at a time in a thread of this process.

    ``processes`` defaults to 0 here: children need :meth:`aclose`, which the runtime
    calls (:meth:`from_settings`, ``FILESERVER_ANALYSIS_PROCESSES``, defaults to 1).
    ``enabled=False``: nothing is decoded and every burst's analysis is ``None``.
    """

    def __init__(
        self,
        config: AnalysisConfig | None = None,
        *,
        enabled: bool = True,
        max_bytes: int = 4 * 1024 * 1024,
        processes: int = 0,
        deadline_s: float | None = None,
    ) -> None:
        self.config = config or AnalysisConfig()
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.processes = max(0, processes)
        self.deadline_s = (
            deadline_for(self.config.max_seconds) if deadline_s is None else deadline_s
        )
        self._pool = _Pool(self.processes, self.config, self.deadline_s) if self.processes else None
        self._thread: asyncio.Semaphore | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> Analyzer:
        """The analyzer the ``FILESERVER_ANALYSIS_*`` settings describe."""
        s = settings
        return cls(
            AnalysisConfig(
                vad_mode=s.analysis_vad_mode,
                min_dbfs=s.analysis_speech_min_dbfs,
                snr_db=s.analysis_speech_snr_db,
                min_speech_ms=s.analysis_min_speech_ms,
                clip_dbfs=s.analysis_clip_dbfs,
                max_seconds=float(s.max_duration_s),
            ),
            enabled=s.analysis_enabled,
            max_bytes=s.analysis_max_bytes,
            processes=s.analysis_processes,
        )

    async def run(
        self, content: bytes | Path, size: int, what: str, *, expected_ms: int | None = None
    ) -> Outcome:
        """Analyse one downloaded recording (``what`` names it in messages; ``expected_ms``
        is the probe's duration, see :func:`analyse`). Never raises but
        :class:`asyncio.CancelledError`."""
        if not self.enabled:
            return Outcome("disabled")
        if size > self.max_bytes:
            log.info(
                "analysis skipped for %s: %d bytes > FILESERVER_ANALYSIS_MAX_BYTES=%d",
                what,
                size,
                self.max_bytes,
            )
            return Outcome("skipped_size")
        if self._pool is not None:
            return await self._pool.analyse(content, what, expected_ms)
        if self._thread is None:
            self._thread = asyncio.Semaphore(1)
        async with self._thread:
            try:
                analysis, cpu = await asyncio.to_thread(_timed, content, self.config, expected_ms)
            except AnalysisError as exc:
                log.warning("analysis failed for %s: %s (stored without it)", what, exc)
                return Outcome("failed")
            except Exception as exc:  # a spool file gone, a bug: this burst only, as a child
                log.warning(
                    "analysis failed for %s: %s: %s (stored without it)",
                    what,
                    type(exc).__name__,
                    exc,
                )
                return Outcome("failed")
        return Outcome("analysed", analysis, cpu)

    def pids(self) -> list[int]:
        """The running children's process ids."""
        return [] if self._pool is None else self._pool.pids()

    async def aclose(self) -> None:
        """Stop the children (their stdin closed, :data:`CLOSE_WAIT_S` to end, then
        killed); analyses asked for afterwards fail. Safe to call twice."""
        if self._pool is not None:
            await self._pool.aclose()


@dataclass(frozen=True)
class Outcome:
    """How :meth:`Analyzer.run` ended: ``analysed`` (with the analysis and its CPU
    seconds), ``disabled``, ``skipped_size`` or ``failed``."""

    result: str
    analysis: Analysis | None = None
    cpu_s: float = 0.0


RESULTS = ("analysed", "disabled", "skipped_size", "failed")


def _timed(
    content: bytes | Path, config: AnalysisConfig, expected_ms: int | None = None
) -> tuple[Analysis, float]:
    """:func:`analyse` and the CPU time this thread spent on it."""
    started = time.thread_time()
    analysis = analyse(content, config, expected_ms=expected_ms)
    return analysis, time.thread_time() - started


# ------------------------------------------------------------------- child processes


def child_command() -> list[str]:
    """How a child is started: this interpreter, ``-P`` (not the working directory's
    packages: the ones of this process, see :func:`child_env`), and this pid."""
    return [sys.executable, "-P", "-m", "fileserver.analysis_child", str(os.getpid())]


def child_env() -> dict[str, str]:
    """This environment with the directory this process's ``fileserver`` came from first
    on ``PYTHONPATH``: the child runs the same code (a worktree's, a wheel's)."""
    root = str(Path(fileserver.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class _NoChild(Exception):
    """No child can take the request now (backing off, the exec failed, closed)."""


@dataclass(eq=False)
class _Entry:
    """One request in a child's queue, and its waiter (possibly gone: cancelled)."""

    request: Request
    what: str
    future: asyncio.Future[Reply]
    release: Callable[[], None]
    started: float = 0.0  # loop time it was sent, or became the head of its queue
    queued: bool = False
    done: bool = False
    logged: bool = False  # the pool logged its failure already

    def finish(self, reply: Reply | None, *, logged: bool = False) -> None:
        """Leave the pool: free its slot and hand the waiter ``reply`` (once)."""
        if self.done:
            return
        self.done = True
        self.logged = logged
        self.release()
        if reply is not None and not self.future.done():
            self.future.set_result(reply)

    def fail(self, error: str, *, logged: bool = True) -> None:
        self.finish(Reply(self.request.id, error=error), logged=logged)


class _Pool:
    """The children, and the bound on requests in flight across them."""

    def __init__(self, processes: int, config: AnalysisConfig, deadline_s: float) -> None:
        self.config = config
        self.deadline_s = deadline_s
        self.children = [_Child(self) for _ in range(processes)]
        self.ids = itertools.count()
        self.closed = False
        self._slots: asyncio.Semaphore | None = None

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc is not None]

    async def analyse(self, content: bytes | Path, what: str, expected_ms: int | None) -> Outcome:
        if self.closed:
            log.warning("analysis failed for %s: the analyzer is closed", what)
            return Outcome("failed")
        if self._slots is None:
            self._slots = asyncio.Semaphore(len(self.children) * PIPELINE_DEPTH)
        slots = self._slots
        await slots.acquire()
        request = Request(next(self.ids), self.config, content, expected_ms)
        future = asyncio.get_running_loop().create_future()
        entry = _Entry(request, what, future, slots.release)
        try:
            await self._pick().submit(entry)
            reply = await future
        except _NoChild as exc:  # logged once by the child slot, not for every burst
            log.debug("analysis failed for %s: %s", what, exc)
            return Outcome("failed")
        except asyncio.CancelledError:
            raise  # the entry stays queued if it was: its late reply is dropped
        except Exception:  # a bug here must not fail the event
            log.exception("analysis failed for %s: an error of the analyzer", what)
            return Outcome("failed")
        finally:
            if not entry.queued:
                entry.finish(None)
        if reply.analysis is None:
            if not entry.logged:
                log.warning("analysis failed for %s: %s (stored without it)", what, reply.error)
            return Outcome("failed", cpu_s=reply.cpu_s)
        return Outcome("analysed", reply.analysis, reply.cpu_s)

    def _pick(self) -> _Child:
        """The child with the shortest queue, among those not backing off if any."""
        now = asyncio.get_running_loop().time()
        ready = [c for c in self.children if c.retry_at <= now] or self.children
        return min(ready, key=lambda c: len(c.queue) + c.waiting)

    async def aclose(self) -> None:
        self.closed = True
        procs = [c.proc for c in self.children if c.proc is not None]
        try:
            for proc in procs:
                if proc.stdin is not None:
                    proc.stdin.close()
            if procs:
                await asyncio.wait(
                    [asyncio.ensure_future(p.wait()) for p in procs], timeout=CLOSE_WAIT_S
                )
        finally:
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for child in self.children:
                child.close()
                if child.writer is not None:
                    child.writer.cancel()
        readers = [c.reader for c in self.children if c.reader is not None]
        if readers:  # they see the ends and reap the children
            _, late = await asyncio.wait(readers, timeout=CLOSE_WAIT_S)
            for task in late:
                task.cancel()


class _Child:
    """One child process slot: the running process (or none yet), the requests sent to it
    in order, and the task reading its replies."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.proc: asyncio.subprocess.Process | None = None
        self.queue: deque[_Entry] = deque()
        self.sent = 0  # how many of the queue's first entries went to the running process
        self.unsent = asyncio.Event()  # wakes the writer
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.starting: asyncio.Task[None] | None = None
        self.watch: asyncio.Timeout | None = None
        self.waiting = 0  # requests waiting for it to start (not queued yet)
        self.ready = False  # the running process said it is ready
        self.answered = 0  # replies from the running process
        self.early_deaths = 0  # children in a row that ended before they were ready
        self.request_deaths = 0  # ready children in a row that ended before a reply
        self.retry_at = 0.0

    async def submit(self, entry: _Entry) -> None:
        """Queue ``entry`` for the writer (the child is started first if need be); raises
        :class:`_NoChild` when none can take it."""
        self.waiting += 1
        try:
            while self.proc is None:
                await asyncio.shield(self._ensure_start())
        finally:
            self.waiting -= 1
        if not self.queue:  # it is the head: its deadline starts now
            entry.started = asyncio.get_running_loop().time()
            if self.watch is not None:
                with contextlib.suppress(RuntimeError):  # the reader is not in its read
                    self.watch.reschedule(entry.started + self.pool.deadline_s)
        entry.queued = True
        self.queue.append(entry)
        self.unsent.set()

    async def _write(self, proc: asyncio.subprocess.Process) -> None:
        """Send the queue to ``proc`` in order, one frame at a time: the next is written
        once the last has gone into the pipe, so at most one frame is held (copied) in
        the transport's buffer whatever the queue holds (the recordings themselves are the
        downloads', held until their events end anyway)."""
        stdin = proc.stdin
        assert stdin is not None
        stdin.transport.set_write_buffer_limits(high=0)  # drain() waits for an empty buffer
        with contextlib.suppress(ConnectionError):  # it died: the reader handles that
            while self.proc is proc:
                if self.sent >= len(self.queue):
                    self.unsent.clear()
                    await self.unsent.wait()
                    continue
                head, body = encode_request(self.queue[self.sent].request)
                self.sent += 1
                stdin.write(head)
                if body:
                    stdin.write(body)
                await stdin.drain()

    def _ensure_start(self) -> asyncio.Task[None]:
        """The start under way, or a new one (a task: a cancelled waiter does not stop
        it half-way, and one start serves every waiter)."""
        if self.starting is None:
            self.starting = asyncio.create_task(self._start())
            self.starting.add_done_callback(_retrieve)
        return self.starting

    async def _start(self) -> None:
        """Start a process; the writer sends it what is queued (a dead child's requests)."""
        try:
            loop = asyncio.get_running_loop()
            if self.pool.closed:
                raise _NoChild("the analyzer is closed")
            if loop.time() < self.retry_at:
                raise _NoChild(_refused(self.retry_at - loop.time()))
            try:
                proc = await asyncio.create_subprocess_exec(
                    *child_command(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env=child_env(),
                )
            except OSError as exc:
                self.early_deaths += 1
                _cannot_start(f"{sys.executable}: {exc}", self._back_off())
                raise _NoChild(f"cannot start an analysis child: {exc}") from None
            if self.pool.closed:
                proc.kill()
                await proc.wait()
                raise _NoChild("the analyzer is closed")
            self.proc, self.answered, self.sent, self.ready = proc, 0, 0, False
            if self.queue:
                self.queue[0].started = loop.time()
            self.reader = asyncio.create_task(self._read(proc))
            self.writer = asyncio.create_task(self._write(proc))
        except _NoChild as exc:
            while self.queue:
                self.queue.popleft().fail(str(exc))
            raise
        finally:
            self.starting = None

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        """Read the ready frame of ``proc`` (within the deadline), then its replies, and
        hand each to the head of the queue, until it dies, breaks the protocol or takes
        longer than the deadline on its head."""
        assert proc.stdout is not None
        why: str | None = None
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout(self.pool.deadline_s):
                    decode_ready(*await _read_frame(proc.stdout))
            except TimeoutError:
                why = f"was not ready after {self.pool.deadline_s:g} s and was killed"
                raise _Ended from None
            self.ready = True
            self.early_deaths = 0
            if self.queue:  # the head's deadline is its analysis's, not the start's too
                self.queue[0].started = loop.time()
            while True:
                head = self.queue[0] if self.queue else None
                when = None if head is None else head.started + self.pool.deadline_s
                try:
                    async with asyncio.timeout_at(when) as self.watch:
                        reply = await _read_reply(proc.stdout)
                finally:
                    self.watch = None
                if not self.queue or self.queue[0].request.id != reply.id:
                    why = f"answered request {reply.id} out of turn"
                    break
                self.queue.popleft().finish(reply)
                self.sent -= 1
                self.answered += 1
                self.request_deaths = 0
                if self.queue:
                    self.queue[0].started = loop.time()
        except _Ended:
            pass
        except TimeoutError:
            why = f"was killed after {self.pool.deadline_s:g} s on one analysis (the deadline)"
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # it died: its exit status says how
        except FrameError as exc:
            why = f"sent a bad frame ({exc}) and was killed"
        except Exception:
            log.exception("reading analysis child pid %d", proc.pid)
            why = "could not be read and was killed"
        await self._died(proc, why)

    async def _died(self, proc: asyncio.subprocess.Process, why: str | None) -> None:
        """``proc`` is gone or is killed now: its head fails, the rest go to a new one
        (or fail too while children cannot start)."""
        # Synchronously, before anything can be sent to a new child: the queue as it is.
        if self.proc is proc:
            self.proc = None
        if self.writer is not None:
            self.writer.cancel()
        self.sent = 0
        head = self.queue.popleft() if self.queue else None
        for entry in [e for e in self.queue if e.future.done()]:  # their waiters are gone
            self.queue.remove(entry)
            entry.finish(None)
        if not self.ready:
            self.early_deaths += 1
        elif self.answered == 0:  # a recording took it down, or it crashes on all
            self.request_deaths += 1
        early = self.early_deaths >= 2
        wait = self._back_off() if early or self.request_deaths >= REQUEST_DEATHS_MAX else 0.0
        if self.pool.closed or wait:
            self.close("the analyzer is closed" if self.pool.closed else _refused(wait))
        if self.queue:
            self._ensure_start()
        if why is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        how = why or await _exit_status(proc)
        if self.pool.closed:
            if head is not None:
                head.fail("the analyzer is closed")
            return
        if wait:
            cause = (
                f"{self.early_deaths} in a row ended before they were ready"
                if early
                else f"{self.request_deaths} in a row ended on their first analysis"
            ) + f", the last pid {proc.pid} {how}; its own error is on the worker's stderr"

            _cannot_start(cause, wait)
        if head is None:
            log.warning("analysis child pid %d %s while idle", proc.pid, how)
        else:
            more = f"; {len(self.queue)} queued analyses go to a new child" if self.queue else ""
            log.warning(
                "analysis child pid %d %s while analysing %s: stored without analysis%s",
                proc.pid,
                how,
                head.what,
                more,
            )
            head.fail(f"analysis child pid {proc.pid} {how}")

    def _back_off(self) -> float:
        """Start no child for a while (doubling with every failure in a row); the wait."""
        failures = max(1, self.early_deaths - 1, self.request_deaths - REQUEST_DEATHS_MAX + 1)
        wait: float = min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2.0 ** (failures - 1))
        self.retry_at = asyncio.get_running_loop().time() + wait
        return wait

    def close(self, why: str = "the analyzer is closed") -> None:
        """Fail what is queued."""
        while self.queue:
            self.queue.popleft().fail(why)


def _cannot_start(cause: str, wait: float) -> None:
    log.error(
        "analysis children cannot start (%s): analyses fail (bursts stored without "
        "analysis) for %.0f s, then a child is tried again; %s=0 runs the analysis in a "
        "thread of the worker instead",
        cause,
        wait,
        SETTING,
    )


def _refused(wait: float) -> str:
    return f"analysis children cannot start: none is tried for {wait:.0f} s ({SETTING})"


def _retrieve(task: asyncio.Task[None]) -> None:
    """A start nobody waited for: its failure was handled (queued requests failed)."""
    if not task.cancelled():
        task.exception()


class _Ended(Exception):
    """The reader stops: ``why`` is said."""


async def _read_frame(stdout: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A frame from a child, which never sends a body (its header, and ``b""``)."""
    head, body = frame_lengths(await stdout.readexactly(PREFIX.size))
    if body:
        raise FrameError("a child's frame has no body")
    return await stdout.readexactly(head), b""


async def _read_reply(stdout: asyncio.StreamReader) -> Reply:
    return decode_reply(*await _read_frame(stdout))


async def _exit_status(proc: asyncio.subprocess.Process) -> str:
    """How ``proc`` ended, in words (killed if it has not within :data:`EXIT_WAIT_S`)."""
    try:
        code = await asyncio.wait_for(proc.wait(), EXIT_WAIT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        code = await proc.wait()
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
