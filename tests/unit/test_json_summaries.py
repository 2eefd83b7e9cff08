"""``--json``: the summary of backfill, redrive and reconcile as one JSON object (one
option, one helper, :mod:`fileserver.summary`); the shapes docs/operations.md documents."""

from __future__ import annotations

import argparse
import io
import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fileserver import exits, redrive, summary
from fileserver.backfill import Held, Kind, PartitionRange, Plan, Summary
from fileserver.cli import build_parser
from fileserver.reconcile import Report as ReconcileReport
from fileserver.repository import FailureRow

VERBS = ["backfill", "redrive", "reconcile"]


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


PLAN = Plan("events", (PartitionRange(0, 0, 18), PartitionRange(1, 4, 10)))
BREAKER = "dead-letter breaker open: 3 consecutive 'source_not_found' failures"


def _keys_are_snake_case(value: object) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            assert key == key.lower() and "-" not in key and " " not in key, key
            _keys_are_snake_case(inner)
    elif isinstance(value, list):
        for inner in value:
            _keys_are_snake_case(inner)


def test_backfill_summary_stopped_by_the_breaker() -> None:
    stopped = Summary(
        PLAN,
        False,
        Counter({Kind.INGESTED: 5, Kind.DEAD_LETTERED: 3, Kind.ALREADY_PRESENT: 2}),
        1.5,
        resume={0: 8},
        breaker=BREAKER,
        held=[Held("events", 0, 8, "source_not_found")],
        dead_lettered_by_reason=Counter({"source_not_found": 3}),
    )
    doc = stopped.as_json()
    _keys_are_snake_case(doc)
    assert doc["mode"] == "replay" and doc["topic"] == "events"
    assert doc["ranges"] == [
        {"partition": 0, "start": 0, "stop": 18, "records": 18},
        {"partition": 1, "start": 4, "stop": 10, "records": 6},
    ]
    assert doc["offsets_in_range"] == 24
    assert doc["counts"] == {
        "ingested": 5,
        "already_present": 2,
        "repaired_object": 0,
        "repaired_row": 0,
        "skipped": 0,
        "already_failed": 0,
        "dead_lettered": 3,
        "problem": 0,
        "error": 0,
    }
    assert doc["total"] == 10
    assert doc["dead_lettered_by_reason"] == {"source_not_found": 3}
    assert doc["breaker"] == BREAKER and doc["interrupted"] is False
    assert doc["held"] == [
        {"topic": "events", "partition": 0, "offset": 8, "reason": "source_not_found"}
    ]
    assert doc["resume"] == {
        "command": "fileserver backfill --topic events --from-offset 0:8 --to-offset 0:18",
        "ranges": [{"partition": 0, "from_offset": 8, "to_offset": 18}],
    }
    text = stopped.render()
    assert f"resume with: {doc['resume']['command']}" in text, "the same command as the text"
    assert "  by reason: source_not_found 3" in text
    assert summary.document("backfill", doc, stopped.exit_code)["exit_status"] == 4


def test_backfill_summary_of_a_dry_run_and_of_a_finished_run() -> None:
    dry = Summary(PLAN, True, Counter({Kind.NEW: 4, Kind.WOULD_DEAD_LETTER: 1}), 0.2)
    doc = dry.as_json()
    assert doc["mode"] == "dry-run"
    assert doc["counts"] == {
        "new": 4,
        "already_present": 0,
        "skipped": 0,
        "would_dead_letter": 1,
        "already_failed": 0,
    }
    assert doc["resume"] is None and doc["held"] == [] and doc["error"] is None
    done = Summary(PLAN, False, Counter({Kind.INGESTED: 1}), 0.1, verify=True, error="boom")
    assert done.as_json()["mode"] == "verify" and done.as_json()["error"] == "boom"
    assert done.exit_code == 1
    # interrupted before the plan was resolved: the keys are still all there
    early = Summary(None, False, Counter(), 0.0, interrupted=True).as_json()
    assert early["topic"] is None and early["ranges"] == [] and early["resume"] is None
    assert set(early) == set(doc)


def _failure(offset: int, reason: str) -> FailureRow:
    return FailureRow(
        kafka_topic="events",
        kafka_partition=0,
        kafka_offset=offset,
        reason=reason,
        detail="d",
        source_url=None,
        payload=b"x",
        id=offset,
        failed_at=datetime.now(UTC),
    )


def test_redrive_report() -> None:
    run = redrive.Report(
        dry_run=False,
        selected_by_reason=Counter({"source_not_found": 3, "invalid_audio": 1}),
        recovered_by_outcome=Counter({"ingested": 2}),
        failed_again_by_reason=Counter({"source_not_found": 2}),
    )
    assert run.exit_code == exits.INCOMPLETE
    assert run.as_json() == {
        "mode": "redrive",
        "selected": 4,
        "selected_by_reason": {"invalid_audio": 1, "source_not_found": 3},
        "recovered": 2,
        "recovered_by_outcome": {"ingested": 2},
        "failed_again": 2,
        "failed_again_by_reason": {"source_not_found": 2},
    }
    dry = redrive.Report(dry_run=True, selected_by_reason=Counter({"malformed_json": 1}))
    dry.predictions.append(
        (_failure(4, "malformed_json"), redrive.Prediction("fail_again", "oops", "malformed_json"))
    )
    assert dry.exit_code == exits.OK
    doc = dry.as_json()
    _keys_are_snake_case(doc)
    assert doc["would"] == {"re_ingest": 0, "clear": 0, "fail_again": 1}
    assert doc["dead_letters"] == [
        {
            "topic": "events",
            "partition": 0,
            "offset": 4,
            "reason": "malformed_json",
            "would": "fail_again",
            "would_reason": "malformed_json",
            "detail": "oops",
        }
    ]
    assert str(dry.predictions[0][1]) == "fail again: malformed_json (oops)"
    assert redrive.Report(dry_run=False).exit_code == exits.OK, "none selected"
