"""The JSON log formatter never drops a record, and a fatal error is a JSON line too."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fileserver import logs


def _logger(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test_logs_json")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_fields_json_cannot_encode_are_written_as_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = io.StringIO()
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    _logger(stream).info(
        "event at %s", when, extra={"fields": {"when": when, "path": Path("/x"), "n": 3}}
    )
    doc = json.loads(stream.getvalue())
    assert doc["when"] == "2026-01-02 03:04:05+00:00"
    assert doc["path"] == "/x"
    assert doc["n"] == 3
    assert "Logging error" not in capsys.readouterr().err


def test_a_broken_format_and_a_circular_field_still_give_a_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = io.StringIO()
    loop: list[object] = []
    loop.append(loop)
    logger = _logger(stream)
    logger.warning("%s and %s", "only one")
    logger.warning("circular", extra={"fields": {"loop": loop}})
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "only one" in first["msg"]
    assert second["msg"] == "circular"
    assert "Logging error" not in capsys.readouterr().err


def test_fatal_is_one_json_line_or_one_text_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.fatal("configuration error: X", json_lines=True, status=2, error="configuration")
    doc = json.loads(capsys.readouterr().err)
    assert doc["level"] == "critical" and doc["exit_status"] == 2
    assert doc["msg"] == "configuration error: X"
    logs.fatal("url postgresql://u:pw1234@h/db", json_lines=False, status=3)
    assert capsys.readouterr().err == "fileserver: url postgresql://u:***@h/db\n"


def test_log_formats() -> None:
    assert logs.wants_json("json") and not logs.wants_json("text")
    assert logs.wants_json("auto", io.StringIO())  # not a terminal
