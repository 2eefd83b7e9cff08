"""fileserver.analysis against its implementation before the decode moved into C.

The reference is fileserver/analysis.py at :data:`REFERENCE_COMMIT` (fab2923: miniaudio's
``stream_any`` through a Python ``StreamableSource``, int64 frame sums, ``np.percentile``,
a VAD decision for every frame), loaded from git like tests/unit/test_analysis_adversarial2.py
loads its own (a clone has it; its absence fails the tests). Every :class:`Analysis` field
must be equal, floats included (``==``, not approximately): the new code computes the
same integers and the same float64 operations on them.

Known and intended differences, each a test below: a file ending in an ID3v1 tag (the
reference lost its last MP3 frame, the new decode reads the tag as the tag), and
``min_speech_ms`` 0 on a burst without speech (the reference raised IndexError).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fileserver import analysis
from fileserver.analysis import BLOCK_FRAMES, PENDING_BLOCKS, AnalysisConfig, analyse
from fileserver.probe import probe_bytes
from tests.unit.analysis_reference import load_reference
from tests.unit.test_analysis_adversarial2 import (
    RATE,
    _id3,
    _riff,
    babble,
    densest_16k_mono,
    densest_48k_stereo,
    mono_then_stereo,
    mp3,
    silent_frame,
    stereo,
    tone,
)

REFERENCE_COMMIT = "fab2923"  # the last fileserver/analysis.py with the streamed decode
FRAME_BYTES = 108  # one MPEG-2 layer III frame at 16 kHz, 24 kbit/s (lameenc: no padding)


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    return load_reference(REFERENCE_COMMIT)


def outcome(
    module: ModuleType, data: bytes | Path, config: dict[str, float] | None = None, **kw: object
) -> tuple[object, ...]:
    """The Analysis as a tuple, or ``("error", class name)``."""
    try:
        cfg = None if config is None else module.AnalysisConfig(**config)
        return dataclasses.astuple(module.analyse(data, cfg, **kw))
    except Exception as exc:  # compared, not hidden
        return ("error", type(exc).__name__)


# --- inputs ---------------------------------------------------------------------------


def _noise(s: float, sigma: float, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, sigma, int(s * RATE))


def _speech_then_silence(speech_s: float, silence_s: float) -> np.ndarray:
    return np.concatenate((babble(speech_s), _noise(silence_s, 30)))


def _frames(data: bytes, count: int) -> bytes:
    """The first ``count`` frames of a lameenc 16 kHz 24 kbit/s stream (108 bytes each)."""
    assert data[:2] == b"\xff\xf3" and len(data) >= count * FRAME_BYTES
    return data[: count * FRAME_BYTES]


CLIPS: dict[str, Callable[[], bytes]] = {
    "babble 2 s": lambda: mp3(babble(2.0)),
    "babble 0.1 s (ends in a partial 30 ms frame)": lambda: mp3(babble(0.1)),
    "silence, speech, silence": lambda: mp3(
        np.concatenate((np.zeros(RATE // 2), babble(2.0), np.zeros(RATE)))
    ),
    "speech then 7 s of quiet (VAD stops early)": lambda: mp3(_speech_then_silence(2.0, 7.0)),
    "speech in the 6th block (VAD of early blocks)": lambda: mp3(
        np.concatenate((_noise(16.0, 30), babble(3.0), _noise(2.0, 30)))
    ),
    "speech only at the start of 40 s": lambda: mp3(_speech_then_silence(1.5, 38.5)),
    "babble 40 s": lambda: mp3(np.tile(babble(4.0), 10)),
    "exactly 3 blocks (250 frames)": lambda: _frames(mp3(babble(12.0)), 250),
    "one frame": lambda: _frames(mp3(babble(1.0)), 1),
    "tone": lambda: mp3(tone(2.0)),
    "digital silence": lambda: mp3(np.zeros(2 * RATE)),
    "white noise": lambda: mp3(_noise(3.0, 3000)),
    "dither-level hiss": lambda: mp3(_noise(2.0, 2)),
    "clipped babble": lambda: mp3(np.clip(babble(2.0) * 8, -32768, 32767)),
    "full-scale square": lambda: mp3(
        np.where(np.arange(2 * RATE) % 40 < 20, -32768, 32767).astype(float)
    ),
    "8 kHz mono": lambda: mp3(babble(2.0, 8000), 8000, 1, 8),
    "44.1 kHz stereo": lambda: mp3(stereo(babble(2.0, 44100)), 44100, 2, 64),
    "44.1 kHz stereo 13 s": lambda: mp3(stereo(babble(13.0, 44100)), 44100, 2, 128),
    "48 kHz stereo then 16 kHz mono": lambda: (
        mp3(stereo(tone(1.0, 48000)), 48000, 2, 64) + mp3(tone(1.0))
    ),
    "16 kHz mono then 44.1 kHz stereo": mono_then_stereo,
    "RIFF header (1 Hz) in front": lambda: _riff(1) + mp3(babble(2.0)),
    "RIFF header (16 kHz) in front": lambda: _riff(16000) + mp3(babble(2.0)),
    "ID3v2 in front": lambda: _id3(20) + mp3(babble(2.0)),
    "HTML in front": lambda: b"<html>" * 50 + mp3(babble(2.0)),
    "70 KB of junk in front": lambda: np.random.default_rng(1).bytes(70_000) + mp3(babble(2.0)),
    "20 KB of junk between two bursts": lambda: (
        mp3(babble(2.0)) + np.random.default_rng(2).bytes(20_000) + mp3(babble(2.0))
    ),
    "truncated mid-frame": lambda: mp3(babble(2.0))[:1000],
    "truncated to a header": lambda: mp3(babble(2.0))[:4],
    "truncated to 1 byte": lambda: mp3(babble(2.0))[:1],
    "empty": lambda: b"",
    "not audio": lambda: b"<html>not found</html>" * 50,
    "free format, densest 16 kHz mono": densest_16k_mono,
    "free format, densest 48 kHz stereo": densest_48k_stereo,
    "free format shorter than its side info": lambda: (
        silent_frame(12, version="2", sr_index=2, bitrate_index=0, mono=True) * 5000
    ),
}

CONFIGS: list[dict[str, float] | None] = [
    None,
    {"vad_mode": 0},
    {"vad_mode": 1, "snr_db": 3.0, "min_dbfs": -70.0, "min_speech_ms": 30},
    {"vad_mode": 2, "snr_db": 15.0, "min_dbfs": -30.0, "min_speech_ms": 1000},
    {"clip_dbfs": -100.0},  # under one LSB: every sample counts as clipped
    {"clip_dbfs": 0.0},
    {"clip_dbfs": -3.0, "max_seconds": 0.5},
    {"max_seconds": 6.0},  # a cut exactly at a block boundary
    {"max_seconds": 12.03},  # a cut inside a frame, past PENDING_BLOCKS
]


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {name: make() for name, make in CLIPS.items()}


def test_the_inputs_reach_what_they_are_for(clips: dict[str, bytes]) -> None:
    """The long clips are long enough to test the blocks they are meant to test."""
    assert analyse(clips["exactly 3 blocks (250 frames)"]).decoded_ms * 16 == 3 * BLOCK_FRAMES
    assert analyse(clips["babble 40 s"]).decoded_ms * 16 > (PENDING_BLOCKS + 2) * BLOCK_FRAMES
    assert 2 * BLOCK_FRAMES == 6.0 * RATE


@pytest.mark.parametrize("name", CLIPS)
def test_every_field_is_the_reference_s(
    name: str, clips: dict[str, bytes], reference: ModuleType
) -> None:
    data = clips[name]
    for config in CONFIGS:
        assert outcome(analysis, data, config) == outcome(reference, data, config), config


@pytest.mark.parametrize(
    "name", ["babble 2 s", "speech then 7 s of quiet (VAD stops early)", "44.1 kHz stereo"]
)
def test_the_probe_s_duration_check_is_the_reference_s(
    name: str, clips: dict[str, bytes], reference: ModuleType
) -> None:
    data = clips[name]
    for expected_ms in (probe_bytes(data).duration_ms, 10 * probe_bytes(data).duration_ms):
        new = outcome(analysis, data, expected_ms=expected_ms)
        assert new == outcome(reference, data, expected_ms=expected_ms)
    assert new == ("error", "AnalysisError")  # stopped at a tenth of the probe's duration


@pytest.mark.parametrize("through", ["memory", "file"])
def test_a_spooled_file_is_analysed_as_the_reference_analyses_its_bytes(
    through: str,
    clips: dict[str, bytes],
    reference: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file up to IN_MEMORY_BYTES is read and decoded from memory; a larger one by
    miniaudio's own file reads (made to happen here by lowering the limit)."""
    if through == "file":
        monkeypatch.setattr(analysis, "IN_MEMORY_BYTES", 0)
    for name, data in clips.items():
        path = tmp_path / "burst.mp3"
        path.write_bytes(data)
        for config in (None, {"max_seconds": 12.03}):
            assert outcome(analysis, path, config) == outcome(reference, data, config), name


# --- the helpers that replace numpy calls and Python loops ----------------------------


def test_the_percentile_is_numpy_s_to_the_last_bit() -> None:
    rng = np.random.default_rng(11)
    for n in [*range(1, 40), 99, 100, 101, 107, 333, 1000]:
        for values in (
            rng.uniform(-120, 0, n),
            np.round(rng.uniform(-90, -10, n), 1),  # ties
            np.full(n, -120.0),
            10.0 * np.log10(np.maximum(rng.exponential(1e-4, n), 1e-12)),
        ):
            for q in (10, 1, 50, 90, 99):
                assert analysis._percentile(values, q) == float(np.percentile(values, q)), (n, q)


def test_the_bridged_count_is_the_reference_s(reference: ModuleType) -> None:
    rng = np.random.default_rng(12)
    for n in (0, 1, 2, 5, 30, 107, 500):
        for share in (0.05, 0.3, 0.7, 0.95):
            speech = rng.random(n) < share
            for gap in (0, 1, 7, 20):
                expected = int(reference._bridge(speech, gap).sum())
                assert analysis._bridged(np.flatnonzero(speech), gap) == expected


# --- where the VAD stops -----------------------------------------------------------------


@pytest.fixture
def vad_frames(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The frames each burst fed to the VAD (``_Vad.decide`` counted)."""
    fed: list[int] = []
    decide = analysis._Vad.decide

    def counted(self: analysis._Vad, frames: object, count: int) -> object:
        fed.append(count)
        return decide(self, frames, count)

    monkeypatch.setattr(analysis._Vad, "decide", counted)
    return fed


def test_a_burst_without_a_loud_frame_skips_the_vad(
    clips: dict[str, bytes], vad_frames: list[int]
) -> None:
    for name in ("digital silence", "white noise", "tone", "dither-level hiss"):
        assert analyse(clips[name]).empty
    assert sum(vad_frames) == 0


def test_the_vad_hears_a_burst_up_to_its_last_loud_frame(
    clips: dict[str, bytes], vad_frames: list[int]
) -> None:
    result = analyse(clips["speech then 7 s of quiet (VAD stops early)"])
    frames = result.decoded_ms // 30
    assert not result.empty and result.trailing_silence_ms > 6000
    assert 2000 // 30 <= sum(vad_frames) <= 2300 // 30 < frames
    vad_frames.clear()
    # PENDING_BLOCKS blocks wait for the levels; each block after them sends the oldest
    # waiting one through the VAD whole. The last loud frame is in the first block, so
    # the blocks still waiting at the end are never heard.
    result = analyse(clips["speech only at the start of 40 s"])
    assert not result.empty
    assert vad_frames == [BLOCK_FRAMES // 480] * len(vad_frames)
    assert sum(vad_frames) <= result.decoded_ms // 30 - (PENDING_BLOCKS - 1) * 100


# --- the intended differences ------------------------------------------------------------

ID3V1 = b"TAG" + b"Unit twelve".ljust(30, b"\0") + bytes(30 + 30 + 4 + 30) + b"\xff"


def test_an_id3v1_tag_at_the_end_no_longer_costs_the_last_frame(
    clips: dict[str, bytes], reference: ModuleType
) -> None:
    """The reference's streamed dr_mp3 had no file length, so it took a trailing ID3v1
    tag for data and dropped the last MP3 frame before it (36 ms at 16 kHz), which moved
    the noise floor and the speech ratio (0.9118 vs 0.971 on a 2 s burst). From memory
    dr_mp3 knows the length and sets the tag aside: the tagged file measures as the
    untagged one."""
    bare = clips["babble 2 s"]
    assert len(ID3V1) == 128
    new = analyse(bare + ID3V1)
    assert dataclasses.astuple(new) == dataclasses.astuple(analyse(bare))
    old = reference.analyse(bare + ID3V1)
    assert old.decoded_ms == new.decoded_ms - 36


def test_min_speech_ms_0_on_a_burst_without_speech_is_empty(
    clips: dict[str, bytes], reference: ModuleType
) -> None:
    """FILESERVER_ANALYSIS_MIN_SPEECH_MS accepts 0; the reference then raised IndexError
    (not an AnalysisError: the Analyzer let it out) on every burst with no speech frame."""
    data = clips["digital silence"]
    assert outcome(reference, data, {"min_speech_ms": 0}) == ("error", "IndexError")
    result = analyse(data, AnalysisConfig(min_speech_ms=0))
    assert result.empty and result.speech_ratio == 0.0
    assert result.leading_silence_ms == result.trailing_silence_ms == result.decoded_ms
    speech = clips["babble 2 s"]
    assert outcome(analysis, speech, {"min_speech_ms": 0}) == outcome(
        reference, speech, {"min_speech_ms": 0}
    )
