"""``--json``: the summary of backfill, redrive and reconcile as one JSON object (one
option, one helper, :mod:`fileserver.summary`); the shapes docs/operations.md documents."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from fileserver import exits, summary
from fileserver.cli import build_parser
from fileserver.reconcile import Report as ReconcileReport

VERBS = ["reconcile"]


@pytest.mark.parametrize("verb", VERBS)
def test_json_is_one_option_for_every_summary_verb(verb: str) -> None:
    parser = build_parser()
    assert parser.parse_args([verb]).json is None
    assert parser.parse_args([verb, "--json"]).json == "-"
    assert parser.parse_args([verb, "--json", "-"]).json == "-"
    assert parser.parse_args([verb, "--json", "out.json"]).json == "out.json"
    if verb == "redrive":
        assert parser.parse_args([verb, "--json", "--dry-run"]).dry_run
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert "--json [FILE]" in verbs.choices[verb].format_help()


def _out(json_path: str | None) -> tuple[summary.Output, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return summary.Output(json_path, out=out, err=err), out, err


def test_output_stdout_file_or_nothing(tmp_path: Path) -> None:
    output, out, err = _out("-")
    assert output.text is err, "the text goes to stderr when stdout is the JSON's"
    output.emit("redrive", {"selected": 0}, 0)
    assert json.loads(out.getvalue()) == {
        "command": "redrive",
        "selected": 0,
        "exit_status": 0,
        "exit_meaning": "done",
    }
    assert err.getvalue() == ""

    path = tmp_path / "s.json"
    output, out, err = _out(str(path))
    assert output.text is out
    output.emit("backfill", {"total": 3}, exits.BREAKER)
    doc = json.loads(path.read_text())
    assert list(doc) == ["command", "total", "exit_status", "exit_meaning"]
    assert doc["exit_meaning"] == dict(exits.TABLE)[4]
    assert out.getvalue() == ""

    output, out, err = _out(None)
    output.emit("reconcile", {}, 1)
    assert output.text is out and out.getvalue() == "" and err.getvalue() == ""


def test_every_exit_status_has_its_meaning() -> None:
    for code, meaning in exits.TABLE:
        assert exits.meaning(code) == meaning
    assert exits.meaning(99) == "unknown"


def test_reconcile_summary_goes_through_the_same_helper() -> None:
    body = ReconcileReport(bucket="b", repair=False).as_json()
    doc = summary.document("reconcile", body, 0)
    assert next(iter(doc)) == "command" and doc["bucket"] == "b" and doc["exit_meaning"] == "done"
