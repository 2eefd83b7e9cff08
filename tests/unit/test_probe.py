"""probe / count_duration_ms / check_duration on generated MP3s (lameenc)."""

from __future__ import annotations

import io
import math
import random
import struct
import wave
from pathlib import Path
from typing import Any

import pytest
from mutagen.mp3 import MP3

from fileserver.devstack.samples import make_mp3
from fileserver.errors import PermanentError, Reason
from fileserver.probe import AudioInfo, check_duration, count_duration_ms, probe

ID3V1 = b"TAG" + b"title".ljust(30, b"\0") + b"\0" * 94 + b"\xff"  # 128 bytes, genre 255
assert len(ID3V1) == 128


@pytest.fixture(scope="module")
def cbr16k() -> bytes:
    """Like Janus' recordings: 3 s, 16 kHz mono, 24 kbps CBR, no Xing header."""
    return make_mp3(3.0, sample_rate=16000, channels=1, bitrate_kbps=24)


def write(tmp_path: Path, data: bytes, name: str = "a.mp3") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    frames = int(seconds * rate)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(
            struct.pack(
                f"<{frames}h",
                *(int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(frames)),
            )
        )
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "sample_rate", "channels", "low_ms", "high_ms"),
    [
        # the encoder adds its delay and padding (up to ~2 frames) but never removes audio
        (dict(sample_rate=16000, channels=1, bitrate_kbps=24), 16000, 1, 3000, 3150),
        (dict(sample_rate=44100, channels=2, vbr=True), 44100, 2, 2950, 3150),
        (dict(sample_rate=8000, channels=1, bitrate_kbps=16), 8000, 1, 3000, 3250),
        (dict(sample_rate=8000, channels=1, bitrate_kbps=24), 8000, 1, 3000, 3250),
        (dict(sample_rate=48000, channels=1, bitrate_kbps=64), 48000, 1, 3000, 3150),
        (dict(sample_rate=22050, channels=2, bitrate_kbps=64), 22050, 2, 3000, 3150),
        (dict(sample_rate=32000, channels=1, bitrate_kbps=48), 32000, 1, 3000, 3150),
        (dict(sample_rate=16000, channels=1, bitrate_kbps=24, id3=True), 16000, 1, 3000, 3150),
        (dict(sample_rate=44100, channels=2, vbr=True, id3=True), 44100, 2, 2950, 3150),
    ],
    ids=[
        "cbr-16k-mono",
        "vbr-44k-stereo",
        "8k-16kbps",
        "8k-24kbps",
        "48k",
        "22k-stereo",
        "32k",
        "id3",
        "vbr-id3",
    ],
)
def test_probe_valid(
    tmp_path: Path,
    kwargs: dict[str, object],
    sample_rate: int,
    channels: int,
    low_ms: int,
    high_ms: int,
) -> None:
    path = write(tmp_path, make_mp3(3.0, **kwargs))  # type: ignore[arg-type]
    info = probe(path)
    assert low_ms <= info.duration_ms <= high_ms
    assert info.sample_rate == sample_rate
    assert info.channels == channels
    assert info.bitrate > 0
    assert count_duration_ms(path) == info.duration_ms


def test_cbr_duration_and_bitrate(tmp_path: Path, cbr16k: bytes) -> None:
    info = probe(write(tmp_path, cbr16k))
    assert abs(info.duration_ms - 3000) <= 150
    assert info.bitrate == 24000
    assert (info.sample_rate, info.channels) == (16000, 1)


def test_vbr_duration_is_counted_not_estimated(tmp_path: Path) -> None:
    path = write(tmp_path, make_mp3(3.0, sample_rate=44100, channels=2, vbr=True))
    audio: Any = MP3(path)  # type: ignore[no-untyped-call]
    mutagen_ms = audio.info.length * 1000
    info = probe(path)
    assert mutagen_ms < 1500  # without a Xing header mutagen reads the first frame only
    assert abs(info.duration_ms - 3000) <= 150


@pytest.mark.parametrize("seconds", [0.5, 1.0, 10.0])
def test_duration_scales_with_length(tmp_path: Path, seconds: float) -> None:
    info = probe(write(tmp_path, make_mp3(seconds)))
    assert seconds * 1000 <= info.duration_ms <= seconds * 1000 + 150


def test_id3_tag_does_not_change_duration(tmp_path: Path, cbr16k: bytes) -> None:
    plain = probe(write(tmp_path, cbr16k, "plain.mp3"))
    tagged_data = make_mp3(3.0, id3=True)
    assert tagged_data.startswith(b"ID3")
    tagged = probe(write(tmp_path, tagged_data, "tagged.mp3"))
    assert tagged == plain


def test_file_larger_than_one_read_block(tmp_path: Path, cbr16k: bytes) -> None:
    # frames are self-contained: 120 copies is a valid 6-minute stream of > 1 MiB
    path = write(tmp_path, cbr16k * 120)
    assert path.stat().st_size > 1024 * 1024
    single = count_duration_ms(write(tmp_path, cbr16k, "one.mp3"))
    assert probe(path).duration_ms == pytest.approx(single * 120, abs=2)


@pytest.mark.parametrize("trailer", [ID3V1, b"APETAGEX" + b"\0" * 24, b"\0" * 3, b"junk"])
def test_trailing_tag_or_junk_is_accepted(tmp_path: Path, cbr16k: bytes, trailer: bytes) -> None:
    plain = count_duration_ms(write(tmp_path, cbr16k, "plain.mp3"))
    info = probe(write(tmp_path, cbr16k + trailer))
    assert info.duration_ms == plain


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world, this is not audio\n" * 100,
        b"\0" * 4096,
        b"\xff" * 4096,
        random.Random(1).randbytes(8192),
        random.Random(2).randbytes(65536),
        wav_bytes(),
        b"ID3\x03\x00\x00\x00\x00\x00\x0a" + b"\0" * 10,  # a tag and no audio
        b'{"msg_type": 1}',
    ],
    ids=["empty", "text", "zeros", "ff", "random-8k", "random-64k", "wav", "id3-only", "json"],
)
def test_not_mp3_is_invalid_audio(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(PermanentError) as info:
        probe(write(tmp_path, data))
    assert info.value.reason is Reason.INVALID_AUDIO
    assert info.value.detail


def test_missing_file_is_invalid_audio(tmp_path: Path) -> None:
    with pytest.raises(PermanentError) as info:
        probe(tmp_path / "absent.mp3")
    assert info.value.reason is Reason.INVALID_AUDIO


@pytest.mark.parametrize("cut", [1, 10, 50, 100])
def test_truncated_mid_frame(tmp_path: Path, cbr16k: bytes, cut: int) -> None:
    # 24 kbps at 16 kHz: every frame is 108 bytes, so cutting 1..100 bytes leaves the
    # last frame's header in place with its body cut short
    with pytest.raises(PermanentError) as info:
        probe(write(tmp_path, cbr16k[:-cut]))
    assert info.value.reason is Reason.INVALID_AUDIO
    assert "truncated" in info.value.detail


def test_truncated_after_a_block_boundary(tmp_path: Path, cbr16k: bytes) -> None:
    with pytest.raises(PermanentError, match="truncated"):
        count_duration_ms(write(tmp_path, cbr16k * 120 + cbr16k[:50]))


def test_truncated_vbr(tmp_path: Path) -> None:
    data = make_mp3(3.0, sample_rate=44100, channels=2, vbr=True)
    with pytest.raises(PermanentError, match="truncated"):
        probe(write(tmp_path, data[:-20]))


def test_count_rejects_file_without_frames(tmp_path: Path) -> None:
    with pytest.raises(PermanentError) as info:
        count_duration_ms(write(tmp_path, b"\0" * 1000))
    assert info.value.reason is Reason.INVALID_AUDIO


def info_of(duration_ms: int) -> AudioInfo:
    return AudioInfo(duration_ms=duration_ms, bitrate=24000, sample_rate=16000, channels=1)


@pytest.mark.parametrize(
    ("duration_ms", "max_s", "ok"),
    [
        (0, 600, False),
        (-5, 600, False),
        (1, 600, True),
        (3096, 600, True),
        (600_000, 600, True),
        (600_001, 600, False),
        (1_000, 1, True),
        (1_001, 1, False),
        (10**9, 600, False),
    ],
)
def test_check_duration(duration_ms: int, max_s: int, ok: bool) -> None:
    if ok:
        check_duration(info_of(duration_ms), max_s)
        return
    with pytest.raises(PermanentError) as info:
        check_duration(info_of(duration_ms), max_s)
    assert info.value.reason is Reason.DURATION_OUT_OF_RANGE
    assert info.value.detail


def test_check_duration_names_the_setting() -> None:
    with pytest.raises(PermanentError, match="FILESERVER_MAX_DURATION_S=600"):
        check_duration(info_of(600_001), 600)
