"""A server subprocess we own (:class:`ManagedServer`), free loopback ports and a TCP probe.

The common part of the dev-stack servers (:mod:`fileserver.devstack.tansu`,
:mod:`~fileserver.devstack.seaweedfs`, :mod:`~fileserver.devstack.postgres`) and of the test
suite's own (``tests/servers/``). A server is spawned as a child process bound to 127.0.0.1,
writes its log to a file in its work directory, and counts as started once its
:meth:`~ManagedServer.probe` (a real client request) succeeds. Every server is stopped at
interpreter exit, and (when started from the main thread on Linux) the child also gets a
parent-death signal so that a SIGKILLed parent leaves no orphans behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 40


class ServerStartError(RuntimeError):
    """A server did not come up (the message carries the tail of its log)."""


# --------------------------------------------------------------------------- ports

_issued_ports: set[int] = set()
_ports_lock = threading.Lock()


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never the same one twice in this process.

    Ports are drawn below the kernel's ephemeral range, so an outgoing connection
    cannot grab one between this call and the server binding it.
    """
    low = _ephemeral_low()
    with _ports_lock:
        if low - 15000 > 1000:
            for _ in range(200):
                port = random.randrange(15000, low)
                if port not in _issued_ports and _can_bind(port):
                    _issued_ports.add(port)
                    return port
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port = int(sock.getsockname()[1])
            if port not in _issued_ports:
                _issued_ports.add(port)
                return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- helpers


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of a log file ("" if it does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def run_coroutine_sync(factory: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T:
    """Run a coroutine to completion on a private event loop in a helper thread.

    Works whether or not the caller is itself inside a running event loop.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        async def bounded() -> T:
            return await asyncio.wait_for(factory(), timeout)

        try:
            result.append(asyncio.run(bounded()))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="devstack-async", daemon=True)
    thread.start()
    thread.join(timeout + 10)
    if thread.is_alive():
        raise TimeoutError(f"coroutine did not finish within {timeout + 10:.0f}s")
    if error:
        raise error[0]
    return result[0]


def _death_signal_preexec(sig: signal.Signals | None) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive ``sig`` when this process dies.

    Only used from the main thread: Linux sends the signal when the *thread* that
    forked the child exits, so a server started from a worker thread would die with it.
    """
    if sig is None or not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        log.debug("not on the main thread: no parent-death signal for the child")
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    signum = int(sig)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signum)

    return preexec


# --------------------------------------------------------------------------- registry

_live: set[ManagedServer] = set()
_live_lock = threading.Lock()
_atexit_registered = False


def _register(server: ManagedServer) -> None:
    global _atexit_registered
    with _live_lock:
        _live.add(server)
        if not _atexit_registered:
            atexit.register(stop_all)
            _atexit_registered = True


def _unregister(server: ManagedServer) -> None:
    with _live_lock:
        _live.discard(server)


def stop_all(timeout: float | None = None) -> None:
    """Stop every server this process started that is still running."""
    with _live_lock:
        servers = list(_live)
    for server in servers:
        try:
            server.stop(timeout)
        except Exception:
            log.exception("could not stop %s", server.name)


# --------------------------------------------------------------------------- base


class ManagedServer:
    """A server subprocess we own: started, probed until ready, stopped, restarted.

    Subclasses set ``stop_signal`` / ``death_signal`` / ``stop_timeout`` and override
    :meth:`probe` (raise until the server answers a real client request) and
    optionally :meth:`prepare` (run before every spawn).
    """

    stop_signal: signal.Signals = signal.SIGTERM
    death_signal: signal.Signals | None = signal.SIGTERM
    stop_timeout: float = 10.0
    ready_timeout: float = 60.0
    slow_graceful_stop = False  # True: SIGKILL after the grace period is the normal path

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        workdir: Path,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        run_as: tuple[int, int] | None = None,
        ports: Iterable[int] = (),
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.workdir = workdir
        self.log_path = log_path or workdir / f"{name}.log"
        self.env = dict(env) if env is not None else None
        self.cwd = cwd or workdir
        self.run_as = run_as
        self.ports = tuple(ports)
        self._proc: subprocess.Popen[bytes] | None = None
        self._cleaned = True  # no process of ours is waiting for clean-up
        self._lock = threading.RLock()

    # -- lifecycle -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The server's process id (None before the first start)."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def prepare(self) -> None:
        """Hook run before every spawn (first start and restarts)."""

    def probe(self) -> None:
        """Raise unless the server answers a real client request."""

    def start(self, ready_timeout: float | None = None) -> None:
        """Spawn the server and wait until :meth:`probe` succeeds."""
        with self._lock:
            if self.is_running():
                return
            self.prepare()
            self._spawn()
        timeout = self.ready_timeout if ready_timeout is None else ready_timeout
        started = time.monotonic()
        try:
            self._wait_ready(started + timeout, timeout)
        except BaseException:
            self.stop(timeout=2.0)
            raise
        log.info(
            "%s ready in %.2fs (pid %s, log %s)",
            self.name,
            time.monotonic() - started,
            self.pid,
            self.log_path,
        )

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            log_file.write(f"\n==== {time.strftime('%F %T')} starting {self.name}\n".encode())
            log_file.flush()
            kwargs: dict[str, Any] = {}
            if self.run_as is not None:
                kwargs.update(user=self.run_as[0], group=self.run_as[1], extra_groups=[])
            log.debug("spawning %s: %s", self.name, " ".join(self.argv))
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
                preexec_fn=_death_signal_preexec(self.death_signal),
                **kwargs,
            )
        self._cleaned = False
        _register(self)

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        delay = 0.05
        last_error: BaseException | None = None
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc is not None else None
                raise ServerStartError(
                    f"{self.name} exited with code {code} while starting; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                self.probe()
                return
            except Exception as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} not ready in time ({timeout:.0f}s; last probe error: "
                    f"{last_error!r}); "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server: ``stop_signal``, then SIGKILL after ``timeout`` s. Idempotent.

        ``timeout`` defaults to the class's ``stop_timeout`` (10 s; shorter for servers
        whose graceful stop only waits on itself).
        """
        with self._lock:
            proc = self._proc
            if proc is None or self._cleaned:
                return
            grace = self.stop_timeout if timeout is None else timeout
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self.stop_signal)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    (log.debug if self.slow_graceful_stop else log.info)(
                        "%s still running %.1fs after %s: SIGKILL",
                        self.name,
                        grace,
                        self.stop_signal.name,
                    )
                    self._signal_group(signal.SIGKILL)
                    proc.wait()
            self._cleanup()
            log.info("%s stopped (exit code %s)", self.name, proc.returncode)

    def kill(self) -> None:
        """SIGKILL the server (and its process group) at once, as a crash would."""
        with self._lock:
            proc = self._proc
            if proc is None or self._cleaned:
                return
            self._signal_group(signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            self._cleanup()
            log.info("%s killed", self.name)

    def _cleanup(self) -> None:
        # Helpers left in the server's process group (e.g. Postgres backends).
        self._signal_group(signal.SIGKILL)
        self._cleaned = True
        _unregister(self)
        self.after_exit()

    def after_exit(self) -> None:
        """Hook run once the process is gone (clean-up of stray files)."""

    def restart(self, ready_timeout: float | None = None) -> None:
        """Stop if running, then start again with the same data and ports."""
        self.stop()
        self.start(ready_timeout)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of this server's log file."""
        return log_tail(self.log_path, lines)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {self.name} pid={self.pid} {state}>"


def start_server(server: ManagedServer, ready_timeout: float | None) -> None:
    """Create the server's work directory, then start it (what every ``start_*`` does)."""
    server.workdir.mkdir(parents=True, exist_ok=True)
    server.start(ready_timeout)
