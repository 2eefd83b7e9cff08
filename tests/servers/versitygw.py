"""Versity S3 Gateway (versitygw) for tests, built from the Go module proxy.

A third, independent S3 implementation for the storage adapter tests: Go, fasthttp/fiber,
its own SigV4 checks, and the ``posix`` backend (one directory per bucket, objects as
files, metadata and ETags in extended attributes: the directory must be on a file system
with user xattrs, as ext4, xfs and tmpfs are). No release binary can be downloaded here,
so ``go install`` builds ``github.com/versity/versitygw/cmd/versitygw`` once (~2 min cold)
into ``~/.cache/fileserver/versitygw-<version>/versitygw`` (or ``$FILESERVER_VERSITYGW_BIN``)
and every later run reuses it. ``python -m tests.servers.versitygw --fetch`` does that
ahead of a test run.

The gateway runs with fixed root credentials (``--access``/``--secret``), path-style
addressing (no ``--virtual-domain``) and ``--keep-alive``: without it the gateway closes
every connection after one response.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fileserver.devstack.servers import LOOPBACK, ManagedServer, free_port, port_open
from tests.servers.toxiproxy import _file_lock

VERSITYGW_VERSION = "1.8.0"
_MODULE = "github.com/versity/versitygw"
_PACKAGE = f"{_MODULE}/cmd/versitygw@v{VERSITYGW_VERSION}"
_BUILD_TIMEOUT = 900.0


def versitygw_binary_path() -> Path:
    """Where the gateway binary lives: ``$FILESERVER_VERSITYGW_BIN`` or the user cache."""
    override = os.environ.get("FILESERVER_VERSITYGW_BIN")
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fileserver" / f"versitygw-{VERSITYGW_VERSION}" / "versitygw"


def _ready(binary: Path) -> bool:
    return binary.is_file() and os.access(binary, os.X_OK)


def ensure_versitygw() -> Path:
    """Build the gateway with ``go install`` on first use; return the binary."""
    binary = versitygw_binary_path()
    if _ready(binary):
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            f"Go (`go`) is needed to build versitygw {VERSITYGW_VERSION} from the module "
            f"proxy into {binary}: install Go >= 1.25, or set FILESERVER_VERSITYGW_BIN to "
            "a versitygw binary"
        )
    with _file_lock(binary.parent / f".{binary.name}.lock"):
        if _ready(binary):
            return binary
        started = time.monotonic()
        print(f"building versitygw {VERSITYGW_VERSION} into {binary} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="versitygw-", dir=binary.parent) as tmp:
            # GOBIN is a private directory, so a half-written binary is never seen; the -X
            # flags make `versitygw --version` print the real version instead of "git".
            env = {**os.environ, "GOBIN": tmp, "CGO_ENABLED": "0"}
            ldflags = f"-s -w -X main.Version=v{VERSITYGW_VERSION} -X main.Build=module-proxy"
            try:
                result = subprocess.run(
                    [go, "install", f"-ldflags={ldflags}", _PACKAGE],
                    cwd=tmp,  # outside any go.mod
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    check=False,
                    timeout=_BUILD_TIMEOUT,
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(
                    f"`go install {_PACKAGE}` did not finish in {_BUILD_TIMEOUT:.0f}s"
                ) from exc
            built = Path(tmp) / "versitygw"
            if result.returncode != 0 or not _ready(built):
                raise RuntimeError(
                    f"`go install {_PACKAGE}` failed (exit code {result.returncode}):\n"
                    f"{result.stdout.strip()}"
                )
            built.replace(binary)
        print(f"built versitygw in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return binary


class VersityGateway(ManagedServer):
    """``versitygw posix`` on a free loopback port with its bucket root in ``workdir``.

    Same handle as :class:`fileserver.devstack.servers.SeaweedS3`: ``endpoint_url``,
    ``access_key``, ``secret_key``, ``region`` and :meth:`client`.
    """

    ready_timeout = 30.0
    stop_timeout = 5.0

    def __init__(
        self,
        workdir: Path,
        binary: Path,
        *,
        access_key: str = "fileserver",
        secret_key: str = "fileserver-secret",
        region: str = "us-east-1",
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.port = free_port()
        self.endpoint_url = f"http://{LOOPBACK}:{self.port}"
        self.data_dir = workdir / "data"
        super().__init__(
            "versitygw",
            [
                str(binary),
                "--port",
                f"{LOOPBACK}:{self.port}",
                "--region",
                region,
                "--keep-alive",
                "posix",
                str(self.data_dir),
            ],
            workdir=workdir,
            # Root credentials from the environment keep them off the command line (ps).
            env={
                **os.environ,
                "ROOT_ACCESS_KEY_ID": access_key,
                "ROOT_SECRET_ACCESS_KEY": secret_key,
            },
            ports=[self.port],
        )
        self._client: Any = None

    def prepare(self) -> None:
        """Create the bucket root directory."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def client(self) -> Any:
        """A boto3 S3 client with this server's endpoint and credentials (path style)."""
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


def start_versitygw(workdir: Path, *, ready_timeout: float | None = None) -> VersityGateway:
    """Start the gateway on a free loopback port (building it if needed); data and log in
    ``workdir``. Stop it with ``stop()`` or use it as a context manager."""
    binary = ensure_versitygw()
    workdir.mkdir(parents=True, exist_ok=True)
    server = VersityGateway(workdir, binary)
    server.start(ready_timeout)
    return server


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.servers.versitygw [--fetch] [--workdir DIR]``."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fetch", action="store_true", help="only build the binary, then exit")
    parser.add_argument("--workdir", type=Path, help="data and log (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.fetch:
        print(ensure_versitygw())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="versitygw-"))
    with start_versitygw(workdir) as server:
        print(
            f"versitygw {VERSITYGW_VERSION} at {server.endpoint_url} (access key "
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
