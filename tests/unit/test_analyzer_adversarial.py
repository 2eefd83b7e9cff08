"""fileserver.analyzer attacked in its thread mode (FILESERVER_ANALYSIS_PROCESSES=0): it
never raises for a recording's sake, as the children never do."""

from __future__ import annotations

from pathlib import Path

import pytest

import fileserver.analyzer as analyzer_module
from fileserver.analyzer import Analyzer


async def test_a_spooled_file_gone_before_the_thread_reads_it_is_a_failed_analysis(
    tmp_path: Path,
) -> None:
    """A child answers an error for it (answer() catches every Exception); the thread let
    FileNotFoundError out of Analyzer.run, failing the event the analysis must never
    fail."""
    gone = tmp_path / "fileserver-spool-gone"
    outcome = await Analyzer(processes=0).run(gone, 9000, "gone")
    assert (outcome.result, outcome.analysis) == ("failed", None)


@pytest.mark.parametrize("error", [MemoryError(), ValueError("a bug"), OSError(5, "EIO")])
async def test_any_error_of_the_analysis_in_the_thread_is_a_failed_analysis(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise error

    monkeypatch.setattr(analyzer_module, "analyse", broken)
    outcome = await Analyzer(processes=0).run(b"x" * 100, 100, "broken")
    assert (outcome.result, outcome.analysis) == ("failed", None)
