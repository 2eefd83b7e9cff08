"""``fileserver``'s table of verbs: each verb module registers its own parser and entry
point; backfill and redrive share the ``--concurrency`` default."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from fileserver import backfill, cli, migrate, redrive, worker
from fileserver.cli import build_parser
from fileserver.devstack import command as dev
from fileserver.repository import FailureFilter
from fileserver.settings import Settings


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_help_lists_every_verb_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    verbs = ["worker", "migrate", "dev", "backfill", "redrive", "reconcile"]
    assert list(_subcommands(build_parser())) == verbs
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    where = [out.index(f"\n    {verb}") for verb in verbs]
    assert where == sorted(where)


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


def test_backfill_and_redrive_default_to_the_workers_concurrency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parser = build_parser()
    assert parser.parse_args(["backfill"]).concurrency is None
    assert parser.parse_args(["redrive"]).concurrency is None
    assert backfill.BackfillOptions.from_args(parser.parse_args(["backfill"])).concurrency is None

    ran: list[tuple[Settings, int]] = []

    async def run_redrive(
        settings: Settings, where: FailureFilter, *, dry_run: bool, concurrency: int
    ) -> int:
        ran.append((settings, concurrency))
        return 0

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
