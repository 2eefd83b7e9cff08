"""Adversarial review of the analysis speed-up (int16/int64 level math, the stream
source class built once; a one-call ``mp3_read_s16`` decode of small bursts was tried and
removed after the breaks below).

The reference for "the same result as before" is the implementation just before the
speed-up (d0a834b, float64 levels), loaded from git (a clone has it; its absence fails).

Breaks found and fixed: a format switch mid-file measured differently on the one-call
path; free-format frames decoded 180 s of PCM from 64 KiB before ``max_seconds`` could
cut it (+34.7 MB peak RSS); a clip level under one LSB counted silence twice (clipped
ratio 2.0). Found on the way (older): dr_mp3 believes an Info/Xing frame count, so audio
appended after a counted file went unheard and the burst was stored ``empty``; the
analysis now refuses a decode that stopped far short of the probe's duration.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import lameenc
import numpy as np
import pytest

from fileserver.analysis import AnalysisConfig, AnalysisError, analyse
from fileserver.probe import check_duration, probe_bytes
from fileserver.settings import Settings
from tests.unit.analysis_reference import load_reference

REPO = Path(__file__).resolve().parents[2]
REFERENCE_COMMIT = "d0a834b"  # the last fileserver/analysis.py before the speed-up
SIZE = 64 * 1024  # the one-call decode's former limit: the hostile inputs are this big
RATE = 16000


# --- inputs ---------------------------------------------------------------------------


def mp3(samples: np.ndarray, rate: int = RATE, channels: int = 1, kbps: int = 24) -> bytes:
    pcm = np.clip(samples, -32768, 32767).astype("<i2").tobytes()
    enc = lameenc.Encoder()
    enc.set_in_sample_rate(rate)
    enc.set_channels(channels)
    enc.set_bit_rate(kbps)
    enc.set_quality(7)
    return bytes(enc.encode(pcm)) + bytes(enc.flush())


def babble(s: float, rate: int = RATE) -> np.ndarray:
    """Speech-like (the same construction as tests/unit/test_analysis.py)."""
    t = np.arange(int(s * rate)) / rate
    buzz = sum(np.sin(2 * math.pi * 120 * k * t) / k for k in range(1, 30))
    shaped = (
        buzz
        * (1 + 0.8 * np.sin(2 * math.pi * 700 * t))
        * (1 + 0.5 * np.sin(2 * math.pi * 1200 * t))
    )
    return 3000 * shaped * (np.sin(2 * math.pi * 4 * t) > -0.3)


def tone(s: float, rate: int = RATE, amplitude: float = 8000) -> np.ndarray:
    return amplitude * np.sin(2 * math.pi * 1000 * np.arange(int(s * rate)) / rate)


def stereo(x: np.ndarray) -> np.ndarray:
    return np.repeat(x, 2)


def frame_header(version: str, sr_index: int, bitrate_index: int, mono: bool) -> bytes:
    """An MPEG audio layer III frame header without CRC (``bitrate_index`` 0: free format)."""
    v = {"1": 3, "2": 2, "2.5": 0}[version]
    return bytes((0xFF, 0xE0 | (v << 3) | 0b011, (bitrate_index << 4) | (sr_index << 2),
                  0xC0 if mono else 0x00))  # fmt: skip


def silent_frame(length: int, **header: object) -> bytes:
    """A frame whose side info is all zero: it decodes to silent granules, whatever its
    length, so free-format frames can be as short as header + side info."""
    return frame_header(**header) + bytes(length - 4)  # type: ignore[arg-type]


def densest_16k_mono() -> bytes:
    """64 KiB the probe accepts: two regular MPEG-2 16 kHz mono 8 kbit/s frames (36 B,
    all the probe walks: 72 ms) then free-format 16 kHz mono frames of 13 bytes (header
    + 9 bytes of side info) that dr_mp3 decodes, 576 samples each: 44 samples a byte."""
    regular = silent_frame(36, version="2", sr_index=2, bitrate_index=1, mono=True)
    free = silent_frame(13, version="2", sr_index=2, bitrate_index=0, mono=True)
    head = regular * 2
    return head + free * ((SIZE - len(head)) // len(free))


def densest_48k_stereo() -> bytes:
    """Like :func:`densest_16k_mono` with free-format MPEG-1 48 kHz stereo frames of 36
    bytes (header + 32 of side info), 2 x 1152 samples each: 64 samples a byte."""
    regular = silent_frame(96, version="1", sr_index=1, bitrate_index=1, mono=False)
    free = silent_frame(36, version="1", sr_index=1, bitrate_index=0, mono=False)
    head = regular * 2
    return head + free * ((SIZE - len(head)) // len(free))


def mono_then_stereo() -> bytes:
    """A 16 kHz mono burst with a 44.1 kHz stereo burst appended (two recordings joined,
    or a gateway that switched its encoder): the first frame is 16 kHz mono, so the
    one-call decode keeps its output as is."""
    return mp3(babble(0.5)) + mp3(stereo(babble(3.0, 44100)), 44100, 2, 128)


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    """fileserver/analysis.py as of :data:`REFERENCE_COMMIT`, as a module."""
    return load_reference(REFERENCE_COMMIT)


def outcome(analyse_fn: object, data: bytes, config: object = None) -> tuple[object, ...]:
    try:
        return dataclasses.astuple(analyse_fn(data, config))  # type: ignore[operator]
    except Exception as exc:  # compared, not hidden
        return ("error", type(exc).__name__)


_MEASURE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import numpy, miniaudio, webrtcvad
    from fileserver import analysis
    data = open({path!r}, "rb").read()
    try:
        analysis.analyse(data[:400])  # warm up: imports, VAD, the stream source class
    except analysis.AnalysisError:
        pass
    def hwm():  # this process's peak RSS (ru_maxrss keeps the parent's across exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    before = hwm()
    analysis.analyse(data)
    print((hwm() - before) * 1024)
    """
)


def peak_growth(data: bytes, tmp_path: Path) -> int:
    """Bytes the peak RSS of a fresh process grew by while analysing ``data`` (VmHWM:
    sees the C allocations of the decoder too, which tracemalloc does not)."""
    path = tmp_path / "input.mp3"
    path.write_bytes(data)
    code = _MEASURE.format(repo=str(REPO), path=str(path))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    )
    return int(out.stdout.split()[-1])


# --- promise 1: the same result as before ----------------------------------------------


def test_a_format_switch_is_analysed_as_before_the_one_call_decode(
    reference: ModuleType,
) -> None:
    """Was a break of the one-call decode: dr_mp3 took the first frame's 16 kHz mono for
    the whole file, and from the first 44.1 kHz stereo frame on its samples differed from
    the converting stream's (RMS -22.70 vs -22.68 dBFS, speech ratio 0.6453 vs 0.6486)."""
    data = mono_then_stereo()
    assert outcome(analyse, data) == outcome(reference.analyse, data)


@pytest.mark.parametrize(
    "name",
    [
        "16k mono babble",
        "16k mono babble, 64 KiB exactly",
        "16k mono babble, 64 KiB + 1",
        "full-scale square at -32768/32767",
        "digital silence",
        "a tenth of a second (not whole 480-sample frames)",
        "8 kHz mono (second decode)",
        "44.1 kHz stereo (second decode)",
        "48 kHz stereo then 16 kHz mono",
    ],
)
def test_ordinary_bursts_are_analysed_as_before(reference: ModuleType, name: str) -> None:
    """Regression guard for promise 1 on what gateways really send (held: 60 random
    lameenc encodes, every rate, mono/stereo, 8-128 kbit/s, layer II, all equal)."""
    long_babble = mp3(np.tile(babble(3.0), 40), kbps=24)
    square = np.where(np.arange(2 * RATE) % 40 < 20, -32768, 32767).astype(float)
    data = {
        "16k mono babble": mp3(babble(3.0)),
        "16k mono babble, 64 KiB exactly": long_babble[:SIZE],
        "16k mono babble, 64 KiB + 1": long_babble[: SIZE + 1],
        "full-scale square at -32768/32767": mp3(square),
        "digital silence": mp3(np.zeros(2 * RATE)),
        "a tenth of a second (not whole 480-sample frames)": mp3(babble(0.1)),
        "8 kHz mono (second decode)": mp3(babble(2.0, 8000), 8000, 1, 8),
        "44.1 kHz stereo (second decode)": mp3(stereo(babble(2.0, 44100)), 44100, 2, 64),
        "48 kHz stereo then 16 kHz mono": mp3(stereo(tone(1.0, 48000)), 48000, 2, 64)
        + mp3(tone(1.0)),
    }[name]
    assert len(long_babble) > SIZE + 1
    assert outcome(analyse, data) == outcome(reference.analyse, data)


def test_a_clip_level_below_one_lsb_does_not_count_silence_twice(
    reference: ModuleType,
) -> None:
    """BREAK. FILESERVER_ANALYSIS_CLIP_DBFS is accepted down to -120; below -90.3 dBFS
    (one LSB) ``clip_level`` is 0, and the new ``x >= 0`` + ``x <= 0`` counts every zero
    sample twice: digital silence has a clipped ratio of 2.0 (was 1.0), a quiet tone
    1.152598 - a share above 1 stored in ``recordings.clipped_ratio``."""
    settings = Settings.from_env({"FILESERVER_ANALYSIS_CLIP_DBFS": "-100"})
    assert settings.analysis_clip_dbfs == -100.0
    assert not [p for p in settings.problems() if "CLIP_DBFS" in p]
    config = AnalysisConfig(clip_dbfs=settings.analysis_clip_dbfs)
    data = mp3(np.zeros(2 * RATE))
    result = analyse(data, config)
    assert 0.0 <= result.clipped_ratio <= 1.0, result
    old_config = reference.AnalysisConfig(clip_dbfs=settings.analysis_clip_dbfs)
    assert dataclasses.astuple(result) == outcome(reference.analyse, data, old_config)


def test_full_scale_negative_samples_are_peak_and_clipped() -> None:
    """Held: -32768 is 0 dBFS and clipped (no int16 negation overflow), also at
    clip_dbfs 0 (clip level 32768, beyond int16)."""
    square = np.where(np.arange(2 * RATE) % 40 < 20, -32768, 32767).astype(float)
    data = mp3(square)
    for clip in (-0.5, 0.0):
        result = analyse(data, AnalysisConfig(clip_dbfs=clip))
        assert result.peak_dbfs == 0.0 and result.clipped_ratio > 0.0, (clip, result)


# --- promise 2: bounded memory and CPU ---------------------------------------------------


@pytest.mark.parametrize("make", [densest_16k_mono, densest_48k_stereo])
def test_the_densest_64_kib_the_probe_accepts_is_analysed_in_bounded_memory(
    make,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    """Was a break of the one-call decode: free format (bitrate index 0) has no floor on
    frame size, so after two regular frames (all the probe walks: 72/48 ms, accepted)
    64 KiB of 13-byte frames decoded to 2,900,160 samples (181 s) at once, +34.7 MB of
    peak RSS against +1.1 MB streamed. Streamed in blocks, the peak stays small."""
    data = make()
    info = probe_bytes(data)
    check_duration(info, 600)  # the pipeline analyses it
    assert info.duration_ms <= 100
    grown = peak_growth(data, tmp_path)
    print(f"peak RSS growth: +{grown:,} B")
    assert grown <= 4_000_000, f"+{grown:,} B"


def test_free_format_after_regular_frames_ends_as_an_analysis() -> None:
    """Held: the hostile free-format inputs end as an Analysis (silence), not a crash;
    frames shorter than their side info end as an AnalysisError."""
    for data in (densest_16k_mono(), densest_48k_stereo()):
        assert analyse(data).empty
    too_short = silent_frame(12, version="2", sr_index=2, bitrate_index=0, mono=True)
    with pytest.raises(AnalysisError):
        analyse(too_short * 5000)


# --- promise 3: a header in front is not decoded as another format ------------------------


def _riff(rate: int) -> bytes:
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    size = struct.pack("<I", 0xFFFFFFFF)
    return b"RIFF" + size + b"WAVE" + b"fmt " + fmt + b"data" + size


def _id3(size: int, flags: int = 0) -> bytes:
    synchsafe = bytes((size >> s) & 0x7F for s in (21, 14, 7, 0))
    return b"ID3\x04\x00" + bytes((flags,)) + synchsafe + bytes(size + (10 if flags else 0))


@pytest.mark.parametrize(
    "prefix",
    [
        _riff(1),
        _riff(16000),
        _id3(20),
        _id3(20, 0x10),
        b"fLaC" + bytes(60),
        b"OggS" + bytes(60),
        b"<html>" * 50,
    ],
    ids=["riff-1hz", "riff-16k", "id3", "id3-footer", "flac", "ogg", "html"],
)
def test_a_header_in_front_is_not_decoded_as_another_format(
    prefix: bytes, reference: ModuleType
) -> None:
    """Held: the decode is MP3 only; the result is the bare MP3's, as before."""
    bare = mp3(babble(2.0))
    data = prefix + bare
    result = outcome(analyse, data)
    assert result == outcome(analyse, bare)
    assert result == outcome(reference.analyse, data)


# --- not this change, found on the way ----------------------------------------------------


def _with_info_tag(tmp_path: Path) -> bytes:
    """2 s of 16 kHz mono tone from ffmpeg's libmp3lame: an Info (Xing) frame that
    counts its frames."""
    out = tmp_path / "tone.mp3"
    try:
        subprocess.run(
            ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
             "sine=frequency=1000:duration=2:sample_rate=16000", "-ac", "1",
             "-c:a", "libmp3lame", "-b:a", "24k", "-id3v2_version", "0", str(out)],
            check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"ffmpeg with libmp3lame is needed (make test installs it): {exc}")
    return out.read_bytes()


def test_an_info_frame_count_does_not_make_a_burst_with_speech_empty(tmp_path: Path) -> None:
    """Was a break (older than the speed-up; the reference agreed): dr_mp3 believes the
    Info/Xing frame count of the first file, so 3 s of speech appended to a 2 s file
    with an Info frame was probed as 5.2 s, analysed as its first 2 s only, and stored
    ``empty``. The analysis now refuses a decode that stopped at less than half of the
    probe's duration: the columns stay NULL (unknown), never a false ``empty``."""
    first = _with_info_tag(tmp_path)
    speech = mp3(babble(3.0))
    assert not analyse(speech).empty
    joined = first + speech
    info = probe_bytes(joined)
    assert info.duration_ms >= 5000
    with pytest.raises(AnalysisError, match=r"decoder stopped at 2[0-9]{3} ms of"):
        analyse(joined, expected_ms=info.duration_ms)
    # a whole file, and a duration cut by max_seconds, are not refused
    assert not analyse(speech, expected_ms=probe_bytes(speech).duration_ms).empty
    cut = analyse(joined, AnalysisConfig(max_seconds=1.5), expected_ms=info.duration_ms)
    assert cut.decoded_ms == 1500
