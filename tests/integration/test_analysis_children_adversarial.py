"""fileserver.analyzer with real children, attacked: recordings that take a child down
with them (here: the test-only hang marker, killed at the deadline) must cost only
themselves, not the analyses queued behind them."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

import fileserver.analyzer as analyzer_module
from fileserver.analysis import analyse
from fileserver.analysis_child import HANG_MARKER_ENV
from fileserver.analyzer import REQUEST_DEATHS_MAX, Analyzer
from tests.integration.test_analysis_children import clips

pytestmark = pytest.mark.slow

HANG = b"HANG-THE-CHILD"


async def test_poison_bursts_at_the_head_of_fresh_children_do_not_fail_innocent_ones(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two recordings in a row that each take down the child working on them (a decoder
    that hangs until the deadline; a crash is the same), the first ones a fresh analyzer
    sees (a worker restarted on a backlog): before, the second child's death counted as
    'two in a row ended before their first reply', the children were declared unable to
    start, and every burst queued behind them failed at once, stored without analysis,
    with an ERROR telling the operator to set FILESERVER_ANALYSIS_PROCESSES=0. The
    children did start: the recordings killed them."""
    monkeypatch.setenv(HANG_MARKER_ENV, HANG.decode())
    caplog.set_level(logging.WARNING, "fileserver.analyzer")
    analyzer = Analyzer(processes=1, deadline_s=3.0)
    innocent = clips()
    try:
        hung = [asyncio.ensure_future(analyzer.run(HANG, len(HANG), f"poison{i}")) for i in (1, 2)]
        await asyncio.sleep(0)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(analyzer.run(b, len(b), f"clip{i}") for i, b in enumerate(innocent))),
            60,
        )
        assert [(await h).result for h in hung] == ["failed", "failed"]
    finally:
        await analyzer.aclose()
    assert [o.analysis for o in outcomes] == [analyse(b) for b in innocent]
    assert "cannot start" not in caplog.text


async def test_children_that_die_on_every_analysis_back_off_after_a_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The other side of the test above: children that start (say they are ready) but die
    on every recording (a broken decoder build) are not restarted once per burst forever:
    after REQUEST_DEATHS_MAX in a row the pool backs off as for children that cannot
    start, and every analysis fails at once meanwhile."""
    starts = 0
    crashing = (
        "import os, fileserver.analysis_child as c; "
        "c.analyse = lambda *a, **k: os._exit(7); c.main([])"
    )

    def command() -> list[str]:
        nonlocal starts
        starts += 1
        return [sys.executable, "-P", "-c", crashing]

    monkeypatch.setattr(analyzer_module, "child_command", command)
    caplog.set_level(logging.WARNING, "fileserver.analyzer")
    analyzer = Analyzer(processes=1)
    data = clips()[0]
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(analyzer.run(data, len(data), f"b{i}") for i in range(40))), 60
        )
    finally:
        await analyzer.aclose()
    assert {o.result for o in outcomes} == {"failed"}
    assert starts <= REQUEST_DEATHS_MAX + 1
    assert f"{REQUEST_DEATHS_MAX} in a row ended on their first analysis" in caplog.text
    assert "exited with status 7" in caplog.text
