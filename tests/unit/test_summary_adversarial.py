"""``--json [FILE]`` under attack: a FILE that cannot be written, signals around the
summary, and the exits that print no summary (docs/operations.md, JSON summaries).

The verbs' runs are replaced by fakes that return a summary (or fail) so that the whole
command (``fileserver.cli.main``: parser, settings, exit status) runs without servers.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fileserver import cli, exits, reconcile, redrive
from fileserver.backfill import Kind, PartitionRange, Plan, Summary
from fileserver.backfill import command as backfill_command
from fileserver.errors import DependencyUnavailable

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


# --- the exits that print no summary ------------------------------------------------


def _json_section() -> str:
    text = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    start = text.index("### JSON summaries")
    end = text.find("\n#", start + 1)
    return " ".join(text[start : end if end > 0 else None].split())


def _failing_runs(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Replace redrive's and reconcile's runs by ones that print their first text and
    then are interrupted (Ctrl-C) or lose the database."""

    async def fail(out: Any) -> Any:
        print("3 dead letters selected", file=out, flush=True)
        if how == "interrupted":
            os.kill(os.getpid(), signal.SIGINT)  # asyncio.run's own Ctrl-C handling
            await asyncio.sleep(10)
        raise DependencyUnavailable("postgres", "connection refused")

    async def run_redrive(settings: Any, where: Any, **kwargs: Any) -> Any:
        return await fail(kwargs.get("out"))

    async def run_reconcile(settings: Any, **kwargs: Any) -> Any:
        return await fail(sys.stderr)  # its progress line

    monkeypatch.setattr(redrive, "run_redrive", run_redrive)
    monkeypatch.setattr(reconcile, "reconcile", run_reconcile)


@pytest.mark.parametrize(
    ("how", "status"), [("interrupted", exits.INTERRUPTED), ("outage", exits.UNREACHABLE)]
)
@pytest.mark.parametrize("verb", ["redrive", "reconcile"])
def test_redrive_and_reconcile_stopped_during_their_run_print_no_summary(
    verb: str,
    how: str,
    status: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Unlike backfill, they have no partial summary: stdout stays empty (``jq`` reads
    nothing, no parse error), a FILE is not written, and docs/operations.md says so."""
    _failing_runs(monkeypatch, how)
    try:
        assert cli.main(["--log-format", "text", verb, "--json"]) == status
        captured = capsys.readouterr()
        assert captured.out == ""
        path = tmp_path / "s.json"
        assert cli.main(["--log-format", "text", verb, "--json", str(path)]) == status
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped")
    assert not path.exists()
    section = _json_section()
    assert "redrive and reconcile print none when they are interrupted" in section
    assert "a second Ctrl-C or SIGTERM (it aborts at once" in section


def test_a_second_ctrl_c_aborts_backfill_without_a_summary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def run_backfill(settings: Any, options: Any, **kwargs: Any) -> Summary:
        os.kill(os.getpid(), signal.SIGINT)  # the first: the run is asked to stop
        await kwargs["stop"].wait()
        os.kill(os.getpid(), signal.SIGINT)  # the second: Python's KeyboardInterrupt
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    monkeypatch.setattr(backfill_command, "run_backfill", run_backfill)
    try:
        status = cli.main(["--log-format", "text", "backfill", "--json"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped")
    captured = capsys.readouterr()
    assert (status, captured.out) == (exits.INTERRUPTED, "")
    assert "SIGINT: stopping (again to abort at once)" in captured.err


def test_a_ctrl_c_after_backfill_printed_its_summary_keeps_its_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found: after the object was printed, asyncio.run still waits for the threads of
    the default executor (an abandoned event's analysis runs in one); a Ctrl-C then was a
    KeyboardInterrupt and the process exited 130 under an object that said 0."""

    def late_ctrl_c() -> None:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    async def run_backfill(settings: Any, options: Any, **kwargs: Any) -> Summary:
        asyncio.get_running_loop().run_in_executor(None, late_ctrl_c)  # still running
        return Summary(None, False, Counter(), 0.1)

    monkeypatch.setattr(backfill_command, "run_backfill", run_backfill)
    try:
        status = cli.main(["--log-format", "text", "backfill", "--json"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped")
    doc = json.loads(capsys.readouterr().out)
    assert status == doc["exit_status"] == exits.OK


@pytest.mark.parametrize("verb", ["redrive", "reconcile"])
def test_a_closed_stderr_sends_nothing_to_stdout_but_the_object(
    verb: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found: with stderr closed (``2>&-``, a daemon's), Python's ``sys.stderr`` is None:
    ``print(text, file=None)`` wrote the text on stdout before the object (redrive), and
    reconcile's progress line failed on ``None.isatty()`` (exit status 1, no object)."""

    async def run_redrive(settings: Any, where: Any, **kwargs: Any) -> redrive.Report:
        print("0 dead letters selected", file=kwargs["out"])  # as run_redrive does
        return redrive.Report(dry_run=False)

    async def run_reconcile(settings: Any, **kwargs: Any) -> reconcile.Report:
        return reconcile.Report(bucket="b", repair=False)

    monkeypatch.setattr(redrive, "run_redrive", run_redrive)
    monkeypatch.setattr(reconcile, "reconcile", run_reconcile)
    monkeypatch.setattr(sys, "stderr", None)
    status = cli.main(["--log-format", "text", verb, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert status == doc["exit_status"] == exits.OK

    monkeypatch.setattr(sys, "stdout", None)  # `>&-`: the object is lost, not the status
    assert cli.main(["--log-format", "text", verb, "--json"]) == exits.OK
