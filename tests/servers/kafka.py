"""Apache Kafka (single-node KRaft) for tests, from the Maven Central jars, on JDK 17.

The jars of ``org.apache.kafka:kafka_2.13`` and a log4j2 SLF4J binding are resolved once
with Maven into ``~/.cache/fileserver/kafka-<version>/libs`` (or ``$FILESERVER_KAFKA_LIBS``)
and reused. ``scripts/fetch-kafka.sh`` does that ahead of a test run.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fileserver.devstack.servers import (
    LOOPBACK,
    ManagedServer,
    ServerStartError,
    free_port,
    log_tail,
    probe_kafka,
)

KAFKA_VERSION = "4.1.2"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.25.3"  # the log4j-core that kafka 4.1.2 depends on
HEAP = "512m"

_COMPLETE = ".complete"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.fileserver</groupId>
  <artifactId>kafka-libs</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <!-- Kafka logs through SLF4J 1.7; without a binding every log line is dropped. -->
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""


def kafka_libs_dir() -> Path:
    """Where the Kafka jars live: ``$FILESERVER_KAFKA_LIBS`` or the user cache."""
    override = os.environ.get("FILESERVER_KAFKA_LIBS")
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fileserver" / f"kafka-{KAFKA_VERSION}" / "libs"


def _libs_ready(libs: Path) -> bool:
    if (libs / _COMPLETE).exists():
        return True
    # A directory someone filled by hand (FILESERVER_KAFKA_LIBS) counts if it has Kafka.
    return any(libs.glob(f"kafka_{SCALA_VERSION}-*.jar"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_kafka_libs() -> Path:
    """Resolve the Kafka jars with Maven (first run downloads ~45 MB); return the libs dir."""
    libs = kafka_libs_dir()
    if _libs_ready(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("Maven (`mvn`) is needed to fetch the Kafka jars: apt-get install maven")
    with _file_lock(libs.parent / f".{libs.name}.lock"):
        if _libs_ready(libs):
            return libs
        started = time.monotonic()
        print(
            f"resolving Apache Kafka {KAFKA_VERSION} jars from Maven Central into {libs} ...",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="kafka-libs-", dir=libs.parent) as tmp:
            pom = Path(tmp) / "pom.xml"
            pom.write_text(
                _POM.format(scala=SCALA_VERSION, kafka=KAFKA_VERSION, log4j=LOG4J_VERSION)
            )
            out = Path(tmp) / "libs"
            result = subprocess.run(
                [
                    mvn,
                    "-B",
                    "-ntp",
                    "-q",
                    "-f",
                    str(pom),
                    "dependency:copy-dependencies",
                    f"-DoutputDirectory={out}",
                    "-DincludeScope=runtime",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
            # Maven 3.8 prints colour resets even in batch mode; pass on only real lines.
            for line in _ANSI.sub("", result.stdout).splitlines():
                if line.strip():
                    print(line, file=sys.stderr)
            if result.returncode != 0 or not any(out.glob("kafka_*.jar")):
                raise RuntimeError(
                    f"mvn could not resolve Kafka {KAFKA_VERSION} (exit code "
                    f"{result.returncode}); see the Maven output above"
                )
            (out / _COMPLETE).write_text(f"kafka {KAFKA_VERSION}\n")
            if libs.exists():
                shutil.rmtree(libs)
            out.rename(libs)
        count = sum(1 for _ in libs.glob("*.jar"))
        print(
            f"resolved {count} jars in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
            flush=True,
        )
    return libs


def kafka_cluster_id() -> str:
    """A random KRaft cluster id (Kafka's Uuid: URL-safe base64, not starting with '-')."""
    while True:
        value = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not value.startswith("-"):
            return value


class KafkaBroker(ManagedServer):
    """A single-node Apache Kafka broker+controller (KRaft) on loopback ports.

    With ``proxied_advertised`` (a fault proxy's ``host:port``) the broker also has a
    ``PROXIED`` listener on ``proxied_upstream`` that advertises that address. Clients
    connect to the advertised address after the bootstrap, so a proxy only in front of
    the bootstrap port would be bypassed: the proxy must forward ``proxied_advertised``
    to ``proxied_upstream``, and clients bootstrap from ``proxied_bootstrap``.
    """

    ready_timeout = 120.0
    stop_timeout = 20.0

    def __init__(
        self,
        workdir: Path,
        libs: Path,
        *,
        heap: str = HEAP,
        proxied_advertised: str | None = None,
    ) -> None:
        self.port = free_port()
        self.controller_port = free_port()
        self.bootstrap = f"{LOOPBACK}:{self.port}"
        self.proxied_port: int | None = free_port() if proxied_advertised else None
        self.proxied_bootstrap = proxied_advertised
        self.proxied_upstream = (
            f"{LOOPBACK}:{self.proxied_port}" if self.proxied_port is not None else None
        )
        self.libs = libs
        self.data_dir = workdir / "data"
        self.properties_path = workdir / "server.properties"
        self.log4j_path = workdir / "log4j2.properties"
        self.classpath = f"{libs}/*"
        java = shutil.which("java") or "java"
        self.java = java
        self.jvm_options = [
            f"-Xmx{heap}",
            "-Xms64m",
            "-XX:+UseSerialGC",
            "-XX:+ExitOnOutOfMemoryError",
            "-XX:-UsePerfData",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_path}",
            f"-Dkafka.logs.dir={workdir}",
        ]
        super().__init__(
            "kafka",
            [
                java,
                *self.jvm_options,
                "-cp",
                self.classpath,
                "kafka.Kafka",
                str(self.properties_path),
            ],
            workdir=workdir,
            ports=[self.port, self.controller_port]
            + ([self.proxied_port] if self.proxied_port is not None else []),
        )

    def server_properties(self) -> str:
        """The broker's server.properties."""
        listeners = (
            f"PLAINTEXT://{LOOPBACK}:{self.port},CONTROLLER://{LOOPBACK}:{self.controller_port}"
        )
        advertised = f"PLAINTEXT://{self.bootstrap}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        if self.proxied_port is not None:
            listeners += f",PROXIED://{self.proxied_upstream}"
            advertised += f",PROXIED://{self.proxied_bootstrap}"
            protocols += ",PROXIED:PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{LOOPBACK}:{self.controller_port}",
            "listeners": listeners,
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": protocols,
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # After a SIGKILL the restarted broker can only register once the old
            # incarnation's session expires (default 9 s).
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "log.retention.check.interval.ms": "300000",
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def prepare(self) -> None:
        """Write the configs and format the log directory on first start."""
        self.properties_path.write_text(self.server_properties())
        self.log4j_path.write_text(_LOG4J2)
        if (self.data_dir / "meta.properties").exists():
            return
        with self.log_path.open("ab") as log_file:
            result = subprocess.run(
                [
                    self.java,
                    *self.jvm_options,
                    "-cp",
                    self.classpath,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    kafka_cluster_id(),
                    "-c",
                    str(self.properties_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                check=False,
                timeout=120,
            )
        if result.returncode != 0:
            raise ServerStartError(
                f"kafka storage format failed ({result.returncode}); last lines of "
                f"{self.log_path}:\n{log_tail(self.log_path)}"
            )

    def probe(self) -> None:
        """Ready when aiokafka's admin client can describe the cluster and list topics."""
        probe_kafka(self.bootstrap, timeout=10.0)


def start_kafka(
    workdir: Path,
    *,
    heap: str = HEAP,
    ready_timeout: float | None = None,
    proxied_advertised: str | None = None,
) -> KafkaBroker:
    """Start a KRaft broker on free loopback ports (fetching the jars if needed).

    ``proxied_advertised``: also listen on a ``PROXIED`` listener advertising that
    address (see :class:`KafkaBroker`).
    """
    libs = ensure_kafka_libs()
    workdir.mkdir(parents=True, exist_ok=True)
    broker = KafkaBroker(workdir, libs, heap=heap, proxied_advertised=proxied_advertised)
    broker.start(ready_timeout)
    return broker


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.servers.kafka [--fetch] [--workdir DIR]``."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fetch", action="store_true", help="only resolve the jars, then exit")
    parser.add_argument("--workdir", type=Path, help="broker data and log (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.fetch:
        print(ensure_kafka_libs())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kafka-"))
    with start_kafka(workdir) as broker:
        print(f"Apache Kafka {KAFKA_VERSION} at {broker.bootstrap} (log {broker.log_path})")
        print("Ctrl-C stops it.")
        try:
            while broker.is_running():
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
