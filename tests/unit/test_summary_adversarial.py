"""``--json [FILE]`` under attack: a FILE that cannot be written, signals around the
summary, and the exits that print no summary (docs/operations.md, JSON summaries).

The verbs' runs are replaced by fakes that return a summary (or fail) so that the whole
command (``fileserver.cli.main``: parser, settings, exit status) runs without servers.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fileserver import cli, exits, reconcile, redrive
from fileserver.backfill import Kind, PartitionRange, Plan, Summary
from fileserver.backfill import command as backfill_command

VERBS = ["backfill", "redrive", "reconcile"]


@pytest.fixture(autouse=True)
def _bare_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("FILESERVER_"):
            monkeypatch.delenv(name)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _fake_runs(
    monkeypatch: pytest.MonkeyPatch, during: Callable[[], None] = lambda: None
) -> list[str]:
    """Replace each verb's run by one that calls ``during`` and then succeeds (exit 0)."""
    ran: list[str] = []

    async def run_backfill(settings: Any, options: Any, **kwargs: Any) -> Summary:
        ran.append("backfill")
        during()
        plan = Plan("events", (PartitionRange(0, 0, 2),))
        return Summary(plan, False, Counter({Kind.INGESTED: 2}), 0.5)

    async def run_redrive(settings: Any, where: Any, **kwargs: Any) -> redrive.Report:
        ran.append("redrive")
        during()
        return redrive.Report(dry_run=False)

    async def run_reconcile(settings: Any, **kwargs: Any) -> reconcile.Report:
        ran.append("reconcile")
        during()
        return reconcile.Report(bucket="b", repair=False)

    monkeypatch.setattr(backfill_command, "run_backfill", run_backfill)
    monkeypatch.setattr(redrive, "run_redrive", run_redrive)
    monkeypatch.setattr(reconcile, "reconcile", run_reconcile)
    return ran


def _bad_paths(tmp_path: Path) -> dict[str, str]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    return {
        "missing-directory": str(tmp_path / "no-such-dir" / "s.json"),
        "a-directory": str(tmp_path),
        "under-a-file": str(a_file / "s.json"),
        "empty": "",  # --json "$OUT" with OUT unset
    }


@pytest.mark.parametrize("case", ["missing-directory", "a-directory", "under-a-file", "empty"])
@pytest.mark.parametrize("verb", VERBS)
def test_a_json_file_that_cannot_be_written_is_refused_before_the_run(
    verb: str,
    case: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found: the run went to its end (a backfill of hours), then open(FILE) raised: exit
    status 1 with a traceback, and the summary was lost."""
    ran = _fake_runs(monkeypatch)
    path = _bad_paths(tmp_path)[case]
    status = cli.main(["--log-format", "text", verb, "--json", path])
    captured = capsys.readouterr()
    assert status == exits.USAGE, captured.err
    assert ran == [], "refused before the run"
    assert captured.out == ""
    (line,) = [x for x in captured.err.splitlines() if x.startswith("fileserver: ")]
    assert "--json" in line
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("verb", VERBS)
def test_a_json_file_that_fails_at_the_end_keeps_the_summary_and_fails(
    verb: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The directory goes away during the run: the object is written on stderr instead
    (not lost), and the exit status is not 0 (a script must not read a stale FILE)."""
    where = tmp_path / "out"
    where.mkdir()
    _fake_runs(monkeypatch, during=lambda: shutil.rmtree(where))
    status = cli.main(["--log-format", "text", verb, "--json", str(where / "s.json")])
    captured = capsys.readouterr()
    assert status == exits.INCOMPLETE
    assert "Traceback" not in captured.err
    start = captured.err.index("\n{\n") + 1
    doc, _ = json.JSONDecoder().raw_decode(captured.err[start:])
    assert doc["command"] == verb
    assert (doc["exit_status"], doc["exit_meaning"]) == (status, exits.meaning(status))
    assert any(
        "cannot write the --json summary" in x and str(where / "s.json") in x
        for x in captured.err.splitlines()
    )


class _SignalOnWrite(io.StringIO):
    """stdout whose every write first sends the process ``sig`` (a Ctrl-C, a SIGTERM
    from the orchestrator, arriving while the summary is written)."""

    def __init__(self, sig: signal.Signals) -> None:
        super().__init__()
        self.sig = sig

    def write(self, s: str) -> int:
        os.kill(os.getpid(), self.sig)
        return super().write(s)


def test_a_signal_while_backfill_writes_its_summary_does_not_cut_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found: the signal handlers were removed before the object was written, so a Ctrl-C
    then raised KeyboardInterrupt in the middle of it (exit status 130 and no object, or
    half of one), and a SIGTERM killed the process there (Python's default action)."""
    _fake_runs(monkeypatch)
    stdout = _SignalOnWrite(signal.SIGINT)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        status = cli.main(["--log-format", "text", "backfill", "--json"])
    except KeyboardInterrupt:  # pytest would stop the session
        pytest.fail("KeyboardInterrupt escaped")
    assert status == exits.OK
    doc = json.loads(stdout.getvalue())
    assert (doc["command"], doc["exit_status"]) == ("backfill", 0)
