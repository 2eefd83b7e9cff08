"""fileserver.analysis on synthetic bursts (encoded with lameenc, no external tools).

Real speech is in tests/integration/test_analysis_corpus.py (espeak-ng, sox, ffmpeg)."""

from __future__ import annotations

import math
from pathlib import Path

import lameenc
import numpy as np
import pytest

from fileserver.analysis import (
    FLOOR_DBFS,
    AnalysisConfig,
    AnalysisError,
    _bridged,
    analyse,
)

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
    # [True] * 4 + [False] * 8 + [True]: the 2-frame gap is speech, the 8-frame one is not
    assert _bridged(np.flatnonzero(speech), 7) == 5
    assert _bridged(np.flatnonzero(speech), 8) == 13
    assert _bridged(np.array([3]), 7) == 1
    assert _bridged(np.array([], dtype=int), 7) == 0
