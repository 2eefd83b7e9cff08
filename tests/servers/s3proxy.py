"""S3Proxy (Andrew Gaul's S3 API over jclouds blob stores) for tests, from Maven Central, on JDK 17.

A second, independent S3 implementation for the storage adapter tests: Jetty + jclouds
with its own SigV2/SigV4 checks, Content-MD5 handling, listing and copy code. The jars of
``org.gaul:s3proxy`` are resolved once with Maven into
``~/.cache/fileserver/s3proxy-<version>/libs`` (or ``$FILESERVER_S3PROXY_LIBS``) and
reused; ``python -m tests.servers.s3proxy --fetch`` does that ahead of a test run.

The server runs ``org.gaul.s3proxy.Main`` with the ``filesystem-nio2`` blob store (one
directory per bucket under the work directory; user metadata and the content MD5 kept
in extended attributes), path-style addressing and one fixed identity
(``s3proxy.authorization=aws-v2-or-v4``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fileserver.devstack.servers import LOOPBACK, ManagedServer, free_port, port_open
from tests.servers.kafka import _file_lock

S3PROXY_VERSION = "2.6.0"
HEAP = "256m"
BLOBSTORE = "filesystem-nio2"

_COMPLETE = ".complete"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAIN = "org.gaul.s3proxy.Main"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.fileserver</groupId>
  <artifactId>s3proxy-libs</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.gaul</groupId>
      <artifactId>s3proxy</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""

# Without a configuration logback logs everything at DEBUG (Jetty's every selector wake-up).
_LOGBACK = """<configuration>
  <appender name="OUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d{HH:mm:ss.SSS} %-5level [%thread] %logger{30} - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.gaul.s3proxy" level="INFO"/>
  <root level="WARN"><appender-ref ref="OUT"/></root>
</configuration>
"""


def s3proxy_libs_dir() -> Path:
    """Where the S3Proxy jars live: ``$FILESERVER_S3PROXY_LIBS`` or the user cache."""
    override = os.environ.get("FILESERVER_S3PROXY_LIBS")
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fileserver" / f"s3proxy-{S3PROXY_VERSION}" / "libs"


def _libs_ready(libs: Path) -> bool:
    if (libs / _COMPLETE).exists():
        return True
    # A directory someone filled by hand (FILESERVER_S3PROXY_LIBS) counts if it has S3Proxy.
    return any(libs.glob("s3proxy-*.jar"))


def ensure_s3proxy_libs() -> Path:
    """Resolve the S3Proxy jars with Maven (first run downloads ~45 MB); return the libs dir."""
    libs = s3proxy_libs_dir()
    if _libs_ready(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError(
            "Maven (`mvn`) is needed to fetch the S3Proxy jars: apt-get install maven"
        )
    with _file_lock(libs.parent / f".{libs.name}.lock"):
        if _libs_ready(libs):
            return libs
        started = time.monotonic()
        print(
            f"resolving S3Proxy {S3PROXY_VERSION} jars from Maven Central into {libs} ...",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="s3proxy-libs-", dir=libs.parent) as tmp:
            pom = Path(tmp) / "pom.xml"
            pom.write_text(_POM.format(version=S3PROXY_VERSION))
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
            for line in _ANSI.sub("", result.stdout).splitlines():
                if line.strip():
                    print(line, file=sys.stderr)
            if result.returncode != 0 or not any(out.glob("s3proxy-*.jar")):
                raise RuntimeError(
                    f"mvn could not resolve S3Proxy {S3PROXY_VERSION} (exit code "
                    f"{result.returncode}); see the Maven output above"
                )
            (out / _COMPLETE).write_text(f"s3proxy {S3PROXY_VERSION}\n")
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


class S3ProxyServer(ManagedServer):
    """S3Proxy on a free loopback port with the ``filesystem-nio2`` store in ``workdir``.

    Same handle as :class:`fileserver.devstack.servers.SeaweedS3`: ``endpoint_url``,
    ``access_key``, ``secret_key``, ``region`` and :meth:`client`.
    """

    ready_timeout = 90.0  # a JVM on a busy 2-core machine
    stop_timeout = 5.0

    def __init__(
        self,
        workdir: Path,
        libs: Path,
        *,
        access_key: str = "fileserver",
        secret_key: str = "fileserver-secret",
        region: str = "us-east-1",
        heap: str = HEAP,
        blobstore: str = BLOBSTORE,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.blobstore = blobstore
        self.port = free_port()
        self.endpoint_url = f"http://{LOOPBACK}:{self.port}"
        self.data_dir = workdir / "data"
        self.properties_path = workdir / "s3proxy.conf"
        self.logback_path = workdir / "logback.xml"
        java = shutil.which("java") or "java"
        super().__init__(
            "s3proxy",
            [
                java,
                f"-Xmx{heap}",
                "-Xms32m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",  # starts in about half the time; plenty for tests
                "-XX:+ExitOnOutOfMemoryError",
                "-XX:-UsePerfData",
                "-Djava.awt.headless=true",
                f"-Dlogback.configurationFile={self.logback_path}",
                "-cp",
                f"{libs}/*",
                _MAIN,
                "--properties",
                str(self.properties_path),
            ],
            workdir=workdir,
            ports=[self.port],
        )
        self._client: Any = None

    def properties(self) -> str:
        """The ``--properties`` file."""
        props = {
            "s3proxy.endpoint": self.endpoint_url,
            "s3proxy.authorization": "aws-v2-or-v4",
            "s3proxy.identity": self.access_key,
            "s3proxy.credential": self.secret_key,
            "jclouds.provider": self.blobstore,
            # The local blob stores ignore these, but Main requires them.
            "jclouds.identity": "local",
            "jclouds.credential": "local",
            "jclouds.filesystem.basedir": str(self.data_dir),
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def prepare(self) -> None:
        """Write the properties and logback files; create the blob store directory."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text(self.properties())
        self.properties_path.chmod(0o600)
        self.logback_path.write_text(_LOGBACK)

    def client(self) -> Any:
        """A boto3 S3 client with this server's endpoint and credentials (path style).

        Checksums only when required, as fileserver's own client: S3Proxy 2.6.0 answers
        boto3's default CRC32 checksum headers (boto3 >= 1.36) with ``NotImplemented``.
        """
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"},
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def probe(self) -> None:
        """Ready when a signed ``ListBuckets`` succeeds."""
        if not port_open(self.port):
            raise ConnectionError(f"port {self.port} not open yet")
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


def start_s3proxy(workdir: Path, *, ready_timeout: float | None = None) -> S3ProxyServer:
    """Start S3Proxy on a free loopback port (fetching the jars if needed); data and log
    in ``workdir``. Stop it with ``stop()`` or use it as a context manager."""
    libs = ensure_s3proxy_libs()
    workdir.mkdir(parents=True, exist_ok=True)
    server = S3ProxyServer(workdir, libs)
    server.start(ready_timeout)
    return server


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.servers.s3proxy [--fetch] [--workdir DIR]``."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fetch", action="store_true", help="only resolve the jars, then exit")
    parser.add_argument("--workdir", type=Path, help="data and log (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.fetch:
        print(ensure_s3proxy_libs())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="s3proxy-"))
    with start_s3proxy(workdir) as server:
        print(
            f"S3Proxy {S3PROXY_VERSION} at {server.endpoint_url} (access key "
            f"{server.access_key}, secret {server.secret_key}; log {server.log_path})"
        )
        print("Ctrl-C stops it.")
        try:
            while server.is_running():
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
