"""``fileserver config``: the settings metadata, the docs table generated from it, and
``--check`` reporting every problem at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fileserver.config import markdown

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _settings_table(text: str) -> str:
    head = "| variable | default | meaning |\n"
    start = text.index(head)
    return text[start : text.index("\n\n", start) + 1]


def test_the_docs_settings_table_is_the_metadata() -> None:
    """Regenerate it with: python -m fileserver.config --markdown (between the table's
    header and the blank line after it in docs/operations.md)."""
    assert _settings_table(OPERATIONS.read_text()) == markdown()


def _run(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FILESERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "fileserver", "config", *argv],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_reports_every_error_at_once_and_unknown_variables() -> None:
    done = _run(
        "--check",
        FILESERVER_CONCURRENCY="many",
        FILESERVER_MAX_FILE_BYTES="0",
        FILESERVER_S3_TRANSPORT="carrier-pigeon",
        FILESERVER_CONCURENCY="500",
    )
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, done.stdout
    for name in ("CONCURRENCY=", "MAX_FILE_BYTES", "S3_TRANSPORT"):
        assert any(name in line for line in errors), name
    assert (
        "warning: FILESERVER_CONCURENCY is not a setting and is ignored "
        "(did you mean FILESERVER_CONCURRENCY?)" in done.stdout
    )
    ok = _run("--check")
    assert ok.returncode == 0 and "settings ok" in ok.stdout


def test_config_lists_every_setting_redacted() -> None:
    done = _run(
        "--json",
        FILESERVER_DATABASE_URL="postgresql+psycopg://u:hunter22@db/x",
        FILESERVER_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        FILESERVER_KAFKA_SASL_USERNAME="u",
        FILESERVER_KAFKA_SASL_PASSWORD="hunter33",
        FILESERVER_SERVE_TOKENS="a" * 64,
    )
    assert done.returncode == 0, done.stderr
    assert "hunter22" not in done.stdout and "hunter33" not in done.stdout
    assert "a" * 64 not in done.stdout
    rows = {row["variable"]: row for row in json.loads(done.stdout)["settings"]}
    assert rows["FILESERVER_DATABASE_URL"]["current"] == "postgresql+psycopg://u:***@db/x"
    assert rows["FILESERVER_DATABASE_URL"]["set"] is True
    assert rows["FILESERVER_CONCURRENCY"]["set"] is False
    assert rows["FILESERVER_CONCURRENCY"]["default"] == str(
        rows["FILESERVER_CONCURRENCY"]["current"]
    )
    assert all(row["meaning"] for row in rows.values())
    text = _run()
    assert text.returncode == 0
    assert "FILESERVER_ALLOWED_SOURCES = unset" in text.stdout
