"""``fileserver``'s table of verbs: each verb module registers its own parser and entry
point; backfill and redrive share the ``--concurrency`` default; the exit statuses every
verb shares (:mod:`fileserver.exits`), the global logging options, and the fatal error
as one line (plain text or JSON)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from fileserver import backfill, cli, exits, migrate, redrive, worker
from fileserver.cli import VERBS, build_parser
from fileserver.devstack import command as dev
from fileserver.errors import ConfigError, DependencyUnavailable
from fileserver.repository import FailureFilter
from fileserver.settings import Settings


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


VERB_NAMES = ["worker", "migrate", "dev", "backfill", "redrive", "reconcile", "serve", "config"]


def test_help_lists_every_verb_in_order_and_the_exit_statuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert list(_subcommands(build_parser())) == VERB_NAMES
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    where = [out.index(f"\n    {verb}") for verb in VERB_NAMES]
    assert where == sorted(where)
    table = out[out.index("exit status (every command):") :]
    for code, meaning in exits.TABLE:
        assert f"{code:>3}  {meaning}" in table
    assert [c for c, _ in exits.TABLE] == [0, 1, 2, 3, 4, 130]


def test_the_exit_statuses_are_the_ones_backfill_reports() -> None:
    from fileserver.backfill import report

    assert report.EXIT_OK == exits.OK
    assert report.EXIT_PARTIAL == exits.INCOMPLETE
    assert report.EXIT_BREAKER == exits.BREAKER
    assert report.EXIT_INTERRUPTED == exits.INTERRUPTED


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: v.name)
def test_each_verbs_help_line_is_its_modules_own(verb: cli.Verb) -> None:
    parser = _subcommands(build_parser())[verb.name]
    assert isinstance(parser, cli.VerbParser)
    assert parser.load().help == verb.help


@pytest.mark.parametrize(
    ("argv", "entry_point"),
    [
        (["worker"], worker.run_command),
        (["migrate"], migrate.run_command),
        (["dev"], dev.run_command),
        (["backfill"], backfill.run_command),
        (["redrive"], redrive.run_command),
    ],
)
def test_each_verb_runs_its_own_modules_entry_point(argv: list[str], entry_point: Any) -> None:
    assert build_parser().parse_args(argv).func is entry_point


HEAVY = ("faust", "boto3", "botocore", "sqlalchemy", "aiohttp", "aiokafka", "alembic", "httpx")


def test_building_the_parser_and_its_help_imports_nothing_heavy() -> None:
    """``fileserver --help`` lists the verbs without importing their modules."""
    code = (
        "import sys, contextlib, io\n"
        "from fileserver.cli import build_parser\n"
        "p = build_parser()\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    p.parse_args(['--help'])\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(done.stdout.split())
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    # and the verbs' modules were not imported either
    modules = {m.module for m in VERBS} - {"fileserver.config"}
    probe = code.replace("m.split('.')[0] ", "m ")
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert not modules & set(done.stdout.split())


def test_python_m_fileserver_help_imports_nothing_heavy() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fileserver", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in HEAVY}
    assert "exit status" in done.stdout


def test_global_log_options_before_or_after_the_verb() -> None:
    parser = build_parser()
    before = parser.parse_args(["-l", "debug", "--log-format", "json", "migrate"])
    after = parser.parse_args(["migrate", "--log-level", "WARNING", "--log-format", "text"])
    neither = parser.parse_args(["migrate"])
    assert (before.log_level, before.log_format) == ("DEBUG", "json")
    assert (after.log_level, after.log_format) == ("WARNING", "text")
    assert (neither.log_level, neither.log_format) == (None, None)
    # given before the verb, not hidden by the verb parser's own (absent) option
    assert parser.parse_args(["-l", "ERROR", "backfill"]).log_level == "ERROR"
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["-l", "loud", "migrate"])
    assert exited.value.code == exits.USAGE


def test_one_metavar_style() -> None:
    """Every option's metavar is upper case (N, SECONDS, FILE, ISO-8601...)."""
    bad = []
    for name, sub in _subcommands(build_parser()).items():
        assert isinstance(sub, cli.VerbParser)
        sub.load()
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0 or action.choices:
                continue
            metavar = str(action.metavar or action.dest.upper())
            if action.metavar is None or metavar != metavar.upper():
                bad.append(f"{name} {action.option_strings[0]} {action.metavar}")
    assert not bad


def test_backfill_and_redrive_default_to_the_workers_concurrency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = build_parser()
    assert parser.parse_args(["backfill"]).concurrency is None
    assert parser.parse_args(["redrive"]).concurrency is None
    assert backfill.BackfillOptions.from_args(parser.parse_args(["backfill"])).concurrency is None

    ran: list[tuple[Settings, int]] = []

    async def run_redrive(settings: Settings, where: FailureFilter, **kwargs: Any) -> Any:
        ran.append((settings, kwargs["concurrency"]))
        return redrive.Report(dry_run=False)

    monkeypatch.setattr(redrive, "run_redrive", run_redrive)
    settings = Settings(concurrency=48)
    assert redrive.run_command(parser.parse_args(["redrive"]), settings) == 0
    assert redrive.run_command(parser.parse_args(["redrive", "--concurrency", "4"]), settings) == 0
    (default, given) = ran
    assert default[1] == default[0].concurrency == 48
    assert given[1] == given[0].concurrency == 4, "the pools are sized from --concurrency too"
    assert (
        backfill.effective_settings(settings, backfill.BackfillOptions(concurrency=4)).concurrency
        == 4
    )


# --- exit statuses ----------------------------------------------------------------------


def test_status_for_each_error() -> None:
    assert exits.status_for(ConfigError("x")) == 2
    assert exits.status_for(DependencyUnavailable("postgres", "down")) == 3
    try:
        try:
            raise DependencyUnavailable("postgres", "down")
        except DependencyUnavailable:
            raise ConfigError("cannot reach FILESERVER_DATABASE_URL") from None
    except ConfigError as exc:
        assert exits.status_for(exc) == 3, "a preflight check's re-raise keeps its context"
    assert exits.status_for(KeyboardInterrupt()) == 130
    assert exits.status_for(RuntimeError("bug")) == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unreachable_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Every dependency on a closed port (Kafka replaced by a producer that starts)."""
    for name in list(os.environ):
        if name.startswith("FILESERVER_"):
            monkeypatch.delenv(name)
    env = {
        "FILESERVER_DATABASE_URL": f"postgresql+psycopg://u:secretpw@127.0.0.1:{_closed_port()}/x",
        "FILESERVER_S3_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
        "FILESERVER_KAFKA_BOOTSTRAP": f"127.0.0.1:{_closed_port()}",
        "FILESERVER_ALLOWED_SOURCES": "127.0.0.1",
        "FILESERVER_SERVE_TOKENS": "0" * 64,
        "FILESERVER_CONNECT_TIMEOUT_S": "1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "testsecret",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    class Producer:
        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            pass

    import fileserver.runtime

    monkeypatch.setattr(fileserver.runtime, "make_producer", lambda settings: Producer())
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield env
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize(
    "argv",
    [["worker"], ["backfill"], ["redrive"], ["redrive", "--dry-run"], ["reconcile"], ["serve"]],
    ids=" ".join,
)
def test_an_unreachable_database_is_exit_status_3_in_one_line(
    argv: list[str], unreachable_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli.main(["--log-format", "text", *argv])
    err = capsys.readouterr().err
    assert status == exits.UNREACHABLE, err
    (line,) = [x for x in err.splitlines() if x.startswith("fileserver: ")]
    assert line.startswith("fileserver: dependency unreachable: ")
    assert "FILESERVER_DATABASE_URL" in line
    assert "secretpw" not in err
    assert "Traceback" not in err


def test_an_unreachable_bucket_is_exit_status_3(
    unreachable_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fileserver import preflight

    async def database_ok(settings: Settings, repo: Any) -> None:
        pass

    monkeypatch.setattr(preflight, "check_database", database_ok)
    monkeypatch.setenv("FILESERVER_READ_TIMEOUT_S", "1")
    assert cli.main(["--log-format", "text", "reconcile"]) == exits.UNREACHABLE
    assert "FILESERVER_S3_BUCKET" in capsys.readouterr().err


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FILESERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "fileserver", *argv],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_against_a_closed_port_is_one_line_naming_the_setting() -> None:
    url = f"postgresql+psycopg://u:secretpw@127.0.0.1:{_closed_port()}/x"
    done = _run(["--log-format", "text", "migrate"], {"FILESERVER_DATABASE_URL": url})
    assert done.returncode == exits.UNREACHABLE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fileserver: dependency unreachable: postgres: cannot reach the ")
    assert "FILESERVER_DATABASE_URL=postgresql+psycopg://u:***@127.0.0.1" in lines[0]
    assert "secretpw" not in done.stderr


def test_fatal_errors_are_json_lines_when_logs_are_json() -> None:
    url = f"postgresql+psycopg://u:pw@127.0.0.1:{_closed_port()}/x"
    done = _run(["migrate"], {"FILESERVER_DATABASE_URL": url})  # stderr is a pipe: auto = json
    assert done.returncode == 3
    (line,) = done.stderr.strip().splitlines()
    doc = json.loads(line)
    assert doc["level"] == "critical"
    assert doc["exit_status"] == 3
    assert doc["dependency"] == "postgres"
    assert "FILESERVER_DATABASE_URL" in doc["msg"]

    done = _run(["worker"], {"FILESERVER_CONCURRENCY": "many", "FILESERVER_CONCURENCY": "5"})
    assert done.returncode == exits.USAGE
    docs = [json.loads(line) for line in done.stderr.strip().splitlines()]
    assert [d["level"] for d in docs] == ["warning", "critical"]
    assert "did you mean FILESERVER_CONCURRENCY?" in docs[0]["msg"]
    assert docs[1]["msg"].startswith("configuration error: FILESERVER_CONCURRENCY='many'")
    assert docs[1]["exit_status"] == 2

    done = _run(["--log-format", "text", "worker"], {"FILESERVER_LOG_FORMAT": "json"})
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fileserver: configuration error: FILESERVER_ALLOWED_SOURCES")


def test_dev_without_the_dev_extra_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stack imports a [dev] package (lameenc, the servers' wheels): one missing is a
    configuration error (exit status 2) saying what to install, not a traceback."""
    monkeypatch.delitem(sys.modules, "fileserver.devstack.dev", raising=False)
    monkeypatch.delitem(sys.modules, "fileserver.devstack.samples", raising=False)
    monkeypatch.setitem(sys.modules, "lameenc", None)  # `import lameenc` fails as if absent
    with pytest.raises(ConfigError, match=r"needs the \[dev\] extra .*fileserver\[dev\]"):
        dev.run_command(build_parser().parse_args(["dev"]), Settings())


def test_redrive_dry_run_touches_postgres_only(
    unreachable_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No Kafka producer is made: with the broker and the database both down, the
    database is what --dry-run reports."""
    import fileserver.runtime

    def no_kafka(settings: Settings) -> Any:
        raise AssertionError("redrive --dry-run made a Kafka producer")

    monkeypatch.setattr(fileserver.runtime, "make_producer", no_kafka)
    assert cli.main(["--log-format", "text", "redrive", "--dry-run"]) == exits.UNREACHABLE
    assert "FILESERVER_DATABASE_URL" in capsys.readouterr().err


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_backfill_refuses_a_log_interval_that_is_not_positive(interval: float) -> None:
    """NaN passed ``<= 0``: the progress log would have fired in a tight loop."""
    with pytest.raises(ConfigError, match="--log-interval"):
        backfill.BackfillOptions(log_interval_s=interval).validate()
