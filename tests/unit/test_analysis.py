"""fileserver.analysis on synthetic bursts (encoded with lameenc, no external tools).

Real speech is in tests/integration/test_analysis_corpus.py (espeak-ng, sox, ffmpeg)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import lameenc
import numpy as np
import pytest

from fileserver.analysis import (
    FLOOR_DBFS,
    AnalysisConfig,
    AnalysisError,
    _bridge,
    analyse,
)
from fileserver.analyzer import Analyzer
from fileserver.errors import ConfigError
from fileserver.metrics import MAX_GROUP_LABELS, Metrics
from fileserver.settings import Settings

RATE = 16000


def mp3(samples: np.ndarray, rate: int = RATE, channels: int = 1) -> bytes:
    pcm = np.clip(samples, -32768, 32767).astype("<i2").tobytes()
    enc = lameenc.Encoder()
    enc.set_in_sample_rate(rate)
    enc.set_channels(channels)
    enc.set_bit_rate(24 if rate <= 16000 else 64)
    enc.set_quality(7)
    return bytes(enc.encode(pcm)) + bytes(enc.flush())


def seconds(s: float, rate: int = RATE) -> np.ndarray:
    return np.arange(int(s * rate)) / rate


def tone(s: float = 2.0, amplitude: float = 8000, hz: float = 1000) -> np.ndarray:
    return amplitude * np.sin(2 * math.pi * hz * seconds(s))


def babble(s: float = 2.0) -> np.ndarray:
    """Speech-like: a buzz at 120 Hz through vowel-like resonances, switched on and off at a
    syllable rate (4 Hz) with 60 ms of silence between syllables."""
    t = seconds(s)
    buzz = sum(np.sin(2 * math.pi * 120 * k * t) / k for k in range(1, 30))
    shaped = (
        buzz
        * (1 + 0.8 * np.sin(2 * math.pi * 700 * t))
        * (1 + 0.5 * np.sin(2 * math.pi * 1200 * t))
    )
    envelope = (np.sin(2 * math.pi * 4 * t) > -0.3).astype(float)
    return 3000 * shaped * envelope


def test_digital_silence_is_empty_at_the_floor() -> None:
    a = analyse(mp3(np.zeros(2 * RATE)))
    assert a.empty and a.speech_ratio == 0.0
    assert (a.peak_dbfs, a.rms_dbfs, a.clipped_ratio) == (FLOOR_DBFS, FLOOR_DBFS, 0.0)
    assert a.leading_silence_ms == a.trailing_silence_ms == a.decoded_ms
    assert 1990 <= a.decoded_ms <= 2200


def test_a_tone_is_empty_with_its_levels_measured() -> None:
    a = analyse(mp3(tone(amplitude=8000)))
    assert a.empty and a.speech_ratio == 0.0
    assert a.peak_dbfs == pytest.approx(20 * math.log10(8000 / 32768), abs=1.0)  # -12.2
    assert a.rms_dbfs == pytest.approx(a.peak_dbfs - 3.0, abs=1.0)  # a sine's crest factor


def test_steady_noise_is_empty_although_the_vad_alone_calls_it_speech() -> None:
    noise = np.random.default_rng(7).normal(0, 3000, 3 * RATE)
    a = analyse(mp3(noise))
    assert a.empty and a.speech_ratio < 0.05
    assert -25 < a.rms_dbfs < -15


def test_a_speech_like_burst_has_speech_and_silence_at_its_edges() -> None:
    burst = np.concatenate((np.zeros(RATE // 2), babble(2.0), np.zeros(RATE)))
    a = analyse(mp3(burst))
    assert not a.empty and 0.3 < a.speech_ratio < 0.7
    assert 400 <= a.leading_silence_ms <= 650
    assert 850 <= a.trailing_silence_ms <= 1300


def test_clipping_is_the_share_of_full_scale_samples() -> None:
    square = np.clip(tone(amplitude=60000), -32768, 32767)  # over half of it flat at the top
    a = analyse(mp3(square))
    assert a.peak_dbfs > -0.1 and 0.3 < a.clipped_ratio < 0.7
    assert analyse(mp3(np.clip(babble() * 8, -32768, 32767))).clipped_ratio > 0.02
    loud = analyse(mp3(tone(amplitude=29000)))  # peaks at -1 dBFS, not clipped
    assert loud.peak_dbfs > -2 and loud.clipped_ratio == 0.0


def test_other_rates_and_stereo_are_resampled_for_the_vad() -> None:
    t = np.arange(2 * 44100) / 44100
    left = 8000 * np.sin(2 * math.pi * 1000 * t)
    stereo = np.stack((left, left), axis=1).reshape(-1)
    a = analyse(mp3(stereo, rate=44100, channels=2))
    assert a.empty and a.peak_dbfs == pytest.approx(-12.2, abs=1.5)
    assert 1990 <= a.decoded_ms <= 2200


def test_a_spooled_file_is_read_like_bytes(tmp_path: Path) -> None:
    data = mp3(np.clip(babble() * 2, -32768, 32767))
    path = tmp_path / "burst.mp3"
    path.write_bytes(data)
    assert analyse(path) == analyse(data)
    assert not analyse(data).empty


def test_decoding_stops_at_max_seconds() -> None:
    a = analyse(mp3(tone(10.0)), AnalysisConfig(max_seconds=3.0))
    assert a.decoded_ms == 3000


def test_what_is_not_mpeg_audio_is_an_analysis_error() -> None:
    with pytest.raises(AnalysisError):
        analyse(b"<html>not found</html>" * 50)


def test_short_gaps_inside_speech_are_bridged() -> None:
    speech = np.array([1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    assert _bridge(speech, 7).tolist() == [True] * 4 + [False] * 8 + [True]


async def test_the_analyzer_never_fails_and_says_why_it_did_not_analyse() -> None:
    data = mp3(tone())
    assert (await Analyzer(enabled=False).run(data, len(data), "u")).result == "disabled"
    skipped = await Analyzer(max_bytes=len(data) - 1).run(data, len(data), "u")
    assert (skipped.result, skipped.analysis) == ("skipped_size", None)
    failed = await Analyzer().run(b"junk" * 100, 400, "u")
    assert (failed.result, failed.analysis) == ("failed", None)
    done = await Analyzer().run(data, len(data), "u")
    assert done.result == "analysed" and done.analysis is not None and 0 < done.cpu_s < 1


async def test_at_most_threads_analyses_run_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
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
    analyzer = Analyzer(threads=2)
    await asyncio.gather(*(analyzer.run(data, len(data), "u") for _ in range(8)))
    assert peak <= 2


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
            "FILESERVER_ANALYSIS_THREADS": "3",
            "FILESERVER_ANALYSIS_VAD_MODE": "1",
            "FILESERVER_ANALYSIS_SPEECH_MIN_DBFS": "-40",
            "FILESERVER_ANALYSIS_SPEECH_SNR_DB": "6",
            "FILESERVER_ANALYSIS_MIN_SPEECH_MS": "500",
            "FILESERVER_ANALYSIS_CLIP_DBFS": "-0.5",
        }
    )
    assert s.not_found_grace_s == 10
    a = Analyzer.from_settings(s)
    assert (a.enabled, a.max_bytes, a.threads) == (False, 1000, 3)
    assert a.config == AnalysisConfig(
        vad_mode=1, min_dbfs=-40, snr_db=6, min_speech_ms=500, clip_dbfs=-0.5, max_seconds=600
    )
    defaults = Analyzer.from_settings(Settings())
    assert defaults.enabled and defaults.config == AnalysisConfig()
    for name, value in (("ANALYSIS_VAD_MODE", "4"), ("ANALYSIS_CLIP_DBFS", "1")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({f"FILESERVER_{name}": value})
