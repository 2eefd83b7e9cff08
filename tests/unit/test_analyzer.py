"""fileserver.analyzer: the analysis's runner never fails an event, bounds how many run
at once, and is built from the settings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fileserver.analysis import AnalysisConfig
from fileserver.analyzer import Analyzer
from fileserver.errors import ConfigError
from fileserver.metrics import MAX_GROUP_LABELS, Metrics
from fileserver.settings import Settings
from tests.unit.test_analysis import mp3, tone


async def test_the_analyzer_never_fails_and_says_why_it_did_not_analyse() -> None:
    data = mp3(tone())
    assert (await Analyzer(enabled=False).run(data, len(data), "u")).result == "disabled"
    skipped = await Analyzer(max_bytes=len(data) - 1).run(data, len(data), "u")
    assert (skipped.result, skipped.analysis) == ("skipped_size", None)
    failed = await Analyzer().run(b"junk" * 100, 400, "u")
    assert (failed.result, failed.analysis) == ("failed", None)
    done = await Analyzer().run(data, len(data), "u")
    assert done.result == "analysed" and done.analysis is not None and 0 < done.cpu_s < 1


async def test_without_processes_one_analysis_runs_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FILESERVER_ANALYSIS_PROCESSES=0: a thread of the worker, one burst at a time (a
    second thread only took the event loop's GIL; the children are
    tests/integration/test_analysis_children.py)."""
    import fileserver.analyzer as module

    running = peak = 0
    real = module._timed

    def counting(content: bytes | Path, config: AnalysisConfig, *args: object) -> object:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return real(content, config, *args)  # type: ignore[arg-type]
        finally:
            running -= 1

    monkeypatch.setattr(module, "_timed", counting)
    data = mp3(tone(5.0))
    analyzer = Analyzer(processes=0)
    await asyncio.gather(*(analyzer.run(data, len(data), "u") for _ in range(8)))
    assert peak == 1 and analyzer.pids() == []


def test_empty_bursts_are_counted_by_group_with_a_bounded_number_of_labels() -> None:
    m = Metrics(process=False)
    for group in range(MAX_GROUP_LABELS + 5):
        m.analysed("analysed", cpu_s=0.001, grp_id=group, empty=True)
    m.analysed("analysed", cpu_s=0.001, grp_id=3, empty=True)
    m.analysed("analysed", cpu_s=0.001, grp_id=3, empty=False)
    value = m.registry.get_sample_value
    assert value("fileserver_empty_bursts_total", {"grp_id": "3"}) == 2
    assert value("fileserver_empty_bursts_total", {"grp_id": "other"}) == 5
    groups = {
        s.labels["grp_id"]
        for f in m.registry.collect()
        if f.name == "fileserver_empty_bursts"
        for s in f.samples
    }
    assert len(groups) == MAX_GROUP_LABELS + 1
    assert value("fileserver_analyses_total", {"result": "analysed"}) == MAX_GROUP_LABELS + 7
    assert value("fileserver_analysis_cpu_seconds_total") == pytest.approx(
        0.001 * (MAX_GROUP_LABELS + 7)
    )


def test_the_settings_build_the_analyzer_and_reject_nonsense() -> None:
    s = Settings.from_env(
        {
            "FILESERVER_NOT_FOUND_GRACE_S": "10",
            "FILESERVER_ANALYSIS_ENABLED": "false",
            "FILESERVER_ANALYSIS_MAX_BYTES": "1000",
            "FILESERVER_ANALYSIS_PROCESSES": "3",
            "FILESERVER_ANALYSIS_VAD_MODE": "1",
            "FILESERVER_ANALYSIS_SPEECH_MIN_DBFS": "-40",
            "FILESERVER_ANALYSIS_SPEECH_SNR_DB": "6",
            "FILESERVER_ANALYSIS_MIN_SPEECH_MS": "500",
            "FILESERVER_ANALYSIS_CLIP_DBFS": "-0.5",
        }
    )
    assert s.not_found_grace_s == 10
    a = Analyzer.from_settings(s)
    assert (a.enabled, a.max_bytes, a.processes) == (False, 1000, 3)
    assert a.config == AnalysisConfig(
        vad_mode=1, min_dbfs=-40, snr_db=6, min_speech_ms=500, clip_dbfs=-0.5, max_seconds=600
    )
    defaults = Analyzer.from_settings(Settings())
    assert defaults.enabled and defaults.config == AnalysisConfig()
    assert (defaults.processes, defaults.deadline_s) == (1, 60.0)
    assert Settings.from_env({"FILESERVER_ANALYSIS_PROCESSES": "0"}).analysis_processes == 0
    for name, value in (("ANALYSIS_VAD_MODE", "4"), ("ANALYSIS_CLIP_DBFS", "1")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({f"FILESERVER_{name}": value})


def test_the_removed_threads_setting_is_refused_naming_its_replacement() -> None:
    """FILESERVER_ANALYSIS_THREADS meant threads of the worker; the analysis runs in child
    processes now. Set, it stops the start (exit status 2) rather than being ignored, and
    it is not also reported as an unknown variable."""
    from fileserver.settings import unknown_variables

    env = {"FILESERVER_ANALYSIS_THREADS": "1"}
    with pytest.raises(ConfigError, match="FILESERVER_ANALYSIS_PROCESSES") as raised:
        Settings.from_env(env)
    assert "FILESERVER_ANALYSIS_THREADS is no longer a setting" in str(raised.value)
    assert unknown_variables(env) == []
