"""probe / count_duration_ms / check_duration on generated MP3s (lameenc)."""

from __future__ import annotations

import io
import math
import random
import struct
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mutagen import MutagenError
from mutagen.mp3 import MP3

import fileserver.probe as probe_module
from fileserver.devstack.samples import id3_tag, make_mp3
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


# --- the optimised walk against a straightforward reference ------------------------------
#
# fileserver.probe reads small files once, memoises header decoding, sums integer ticks
# and skips runs of equal headers with strided slices; large files are walked in blocks.
# The reference below is the plain algorithm: decode every header, one frame at a time,
# over the whole file in memory, summing float seconds; and mutagen's MP3() on the path.

REF_BITRATES = {  # kbps by (MPEG-1?, layer)
    (True, 1): [0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448],
    (True, 2): [0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384],
    (True, 3): [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320],
    (False, 1): [0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256],
    (False, 2): [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
    (False, 3): [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
}
REF_RATES = {3: [44100, 48000, 32000], 2: [22050, 24000, 16000], 0: [11025, 12000, 8000]}


def ref_frame(header: bytes) -> tuple[int, int, int] | None:
    """(length, samples, sample_rate) of a 4-byte frame header, or None."""
    if len(header) < 4 or header[0] != 0xFF or header[1] >> 5 != 0b111:
        return None
    version, layer_bits = (header[1] >> 3) & 3, (header[1] >> 1) & 3
    bitrate_index, rate_index, padding = header[2] >> 4, (header[2] >> 2) & 3, (header[2] >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    layer = 4 - layer_bits
    bitrate = REF_BITRATES[(version == 3, layer)][bitrate_index] * 1000
    rate = REF_RATES[version][rate_index]
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4, 384, rate
    samples = 576 if layer == 3 and version != 3 else 1152
    return samples // 8 * bitrate // rate + padding, samples, rate


def ref_count_ms(data: bytes) -> int:
    start = 0
    if len(data) >= 10 and data[:3] == b"ID3":
        size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
        start = 10 + size + (10 if data[5] & 0x10 else 0)
    window = data[start : start + 64 * 1024 + 4]
    first = None
    for pos in range(len(window) - 4):
        frame = ref_frame(window[pos : pos + 4])
        if frame is not None:
            second = start + pos + frame[0]
            if ref_frame(data[second : second + 4]) is not None:
                first = start + pos
                break
    if first is None:
        raise PermanentError(Reason.INVALID_AUDIO, "no two consecutive MPEG frames found")
    seconds = 0.0
    pos = first
    while pos + 4 <= len(data):
        frame = ref_frame(data[pos : pos + 4])
        if frame is None:
            break
        length, samples, rate = frame
        if pos + length > len(data):
            raise PermanentError(
                Reason.INVALID_AUDIO,
                f"truncated: the frame at byte {pos} needs {length} bytes, "
                f"the file ends after {len(data) - pos}",
            )
        seconds += samples / rate
        pos += length
    return round(seconds * 1000)


def outcome(call: Any, path: Path) -> object:
    """What ``call(path)`` returned, or the reason and detail of its PermanentError."""
    try:
        return call(path)
    except PermanentError as exc:
        return (exc.reason, exc.detail)


def ref_probe(path: Path) -> AudioInfo:
    try:
        audio: Any = MP3(path)  # type: ignore[no-untyped-call]
    except (MutagenError, OSError, ValueError, EOFError) as exc:
        raise PermanentError(Reason.INVALID_AUDIO, f"not MPEG audio: {exc}") from None
    info = audio.info
    if info is None or info.sample_rate <= 0 or info.channels <= 0:
        raise PermanentError(Reason.INVALID_AUDIO, "MPEG header without sample rate or channels")
    return AudioInfo(
        duration_ms=ref_count_ms(path.read_bytes()),
        bitrate=int(info.bitrate),
        sample_rate=int(info.sample_rate),
        channels=int(info.channels),
    )


@pytest.fixture
def blockwise(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Walk every file in blocks of the given size instead of in memory."""

    def use(block: int) -> None:
        monkeypatch.setattr(probe_module, "_IN_MEMORY", 0)
        monkeypatch.setattr(probe_module, "_BLOCK", block)

    return use


def assert_agrees(path: Path) -> object:
    """probe and count_duration_ms give what the reference gives, errors included."""
    expected = outcome(ref_probe, path)
    assert outcome(probe, path) == expected
    assert outcome(count_duration_ms, path) == outcome(lambda p: ref_count_ms(p.read_bytes()), path)
    return expected


@pytest.fixture(scope="module")
def samples() -> dict[str, bytes]:
    vbr = make_mp3(3.0, sample_rate=44100, channels=2, vbr=True)
    return {
        "cbr-16k": make_mp3(3.0),
        "cbr-44k-padded": make_mp3(3.0, sample_rate=44100, channels=2, bitrate_kbps=128),
        "cbr-8k": make_mp3(2.0, sample_rate=8000, bitrate_kbps=16),
        "cbr-22k": make_mp3(2.0, sample_rate=22050, channels=2, bitrate_kbps=64),
        "vbr-44k": vbr,
        "vbr-22k": make_mp3(2.0, sample_rate=22050, channels=2, vbr=True, freq_hz=3000),
        "id3v2": make_mp3(3.0, id3=True),
        "vbr-id3v2": make_mp3(3.0, sample_rate=44100, channels=2, vbr=True, id3=True),
        "id3v1": make_mp3(3.0) + ID3V1,
        "id3v2-and-v1": make_mp3(3.0, id3=True) + ID3V1,
        "vbr-id3v1": vbr + ID3V1,
        "ape": make_mp3(3.0) + b"APETAGEX" + b"\0" * 24,
        "junk": make_mp3(3.0) + b"junk",
        "junk-3": make_mp3(3.0) + b"\xff\xfb\x90",
        "3-header-bytes": make_mp3(3.0) + make_mp3(3.0)[:3],  # too short for a header
        "truncated-after-header": make_mp3(3.0) + make_mp3(3.0)[:4],
        "truncated": make_mp3(3.0)[:-50],
        "truncated-vbr": vbr[:-20],
        "truncated-to-the-header": make_mp3(3.0)[:-104],
        "junk-then-audio": b"\0" * 1000 + make_mp3(1.0),
        "audio-junk-audio": make_mp3(1.0) + b"junk" + make_mp3(1.0),
        "two-rates": make_mp3(1.0) + make_mp3(1.0, sample_rate=44100, bitrate_kbps=64),
    }


SAMPLE_NAMES = [
    "cbr-16k",
    "cbr-44k-padded",
    "cbr-8k",
    "cbr-22k",
    "vbr-44k",
    "vbr-22k",
    "id3v2",
    "vbr-id3v2",
    "id3v1",
    "id3v2-and-v1",
    "vbr-id3v1",
    "ape",
    "junk",
    "junk-3",
    "3-header-bytes",
    "truncated-after-header",
    "truncated",
    "truncated-vbr",
    "truncated-to-the-header",
    "junk-then-audio",
    "audio-junk-audio",
    "two-rates",
]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_walk_agrees_with_reference(tmp_path: Path, samples: dict[str, bytes], name: str) -> None:
    path = write(tmp_path, samples[name])
    expected = assert_agrees(path)
    if name.startswith("truncated"):
        assert isinstance(expected, tuple)
        assert expected[0] is Reason.INVALID_AUDIO
        assert str(expected[1]).startswith("truncated: the frame at byte ")
    else:
        assert isinstance(expected, AudioInfo)
        assert expected.duration_ms > 900


@pytest.mark.parametrize("block", [4, 5, 107, 108, 109, 1000, 4096, 65536])
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_blockwise_walk_agrees_with_reference(
    tmp_path: Path,
    samples: dict[str, bytes],
    blockwise: Callable[[int], None],
    name: str,
    block: int,
) -> None:
    path = write(tmp_path, samples[name])
    in_memory = outcome(probe, path)
    blockwise(block)
    assert outcome(probe, path) == in_memory
    assert_agrees(path)


@pytest.mark.parametrize("tail", [b"", ID3V1, b"junk", b"\xff\xf3\x00"])
@pytest.mark.parametrize("cut", [0, 1, 50])
def test_file_over_the_in_memory_limit(tmp_path: Path, cut: int, tail: bytes) -> None:
    # VBR, so that frame lengths vary across the 1 MiB read blocks
    clip = make_mp3(3.0, sample_rate=44100, channels=2, vbr=True)
    data = clip * (probe_module._IN_MEMORY // len(clip) + 2)
    path = write(tmp_path, data[: len(data) - cut] + tail)
    assert path.stat().st_size > probe_module._IN_MEMORY
    expected = assert_agrees(path)
    # the tail completes a cut last frame if it is long enough
    assert isinstance(expected, AudioInfo) == (len(tail) >= cut)


def mutations(seed: int, count: int, bases: list[bytes]) -> list[bytes]:
    """Damaged copies of ``bases``: cut, spliced, bit-flipped, tagged, headers rewritten."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(rnd.choice(bases))
        for _ in range(rnd.randint(1, 3)):
            op = rnd.randrange(6)
            if op == 0:
                del data[rnd.randrange(len(data) + 1) :]
            elif op == 1:
                at = rnd.randrange(len(data) + 1)
                data[at:at] = rnd.randbytes(rnd.randint(1, 300))
            elif op == 2 and data:
                data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
            elif op == 3:
                data += rnd.choice([ID3V1, b"APETAGEX" + bytes(24), b"junk", b"\xff\xfb"])
            elif op == 4:
                data[:0] = id3_tag("x" * rnd.randint(0, 40))
            elif op == 5 and len(data) > 4:
                at = rnd.randrange(len(data) - 3)
                data[at : at + 3] = bytes([0xFF, rnd.randrange(0xE0, 0x100), rnd.randrange(256)])
        out.append(bytes(data))
    return out


@pytest.mark.parametrize("block", [None, 5, 333])
@pytest.mark.parametrize("seed", [1, 2])
def test_damaged_files_agree_with_reference(
    tmp_path: Path,
    samples: dict[str, bytes],
    blockwise: Callable[[int], None],
    seed: int,
    block: int | None,
) -> None:
    if block is not None:
        blockwise(block)
    bases = [samples[n] for n in ("cbr-16k", "cbr-44k-padded", "vbr-44k", "id3v2", "cbr-8k")]
    seen = set()
    for i, data in enumerate(mutations(seed, 150, bases)):
        expected = assert_agrees(write(tmp_path, data, f"{i}.mp3"))
        seen.add("valid" if isinstance(expected, AudioInfo) else str(expected[1]).split(":")[0])  # type: ignore[index]
    # the mix has valid, truncated and unreadable files
    assert {"valid", "truncated", "not MPEG audio"} <= seen


@pytest.fixture(scope="module")
def cbr15s() -> bytes:
    # 24 kbps at 16 kHz: 416+ frames of 108 bytes with the same header, longer than a run
    # window, so each changed frame falls at a different place in the strided check
    data = make_mp3(15.0)
    assert data[0] == 0xFF and len(data) // 108 > 415
    return data


@pytest.mark.parametrize("frame", [0, 1, 2, 3, 4, 5, 50, 255, 256, 257, 300, 400, 415])
@pytest.mark.parametrize("change", ["private-bit", "crc-bit", "padding", "not-a-header"])
def test_one_header_changed_inside_a_cbr_run(
    tmp_path: Path, blockwise: Callable[[int], None], cbr15s: bytes, frame: int, change: str
) -> None:
    data = bytearray(cbr15s)
    at = frame * 108
    if change == "private-bit":
        data[at + 2] ^= 0x01  # another header of the same length
    elif change == "crc-bit":
        data[at + 1] ^= 0x01
    elif change == "padding":
        data[at + 2] ^= 0x02  # one byte longer: every later header is now off by one
    else:
        data[at + 1] = 0x00
    path = write(tmp_path, bytes(data))
    assert_agrees(path)
    blockwise(1000)
    assert_agrees(path)


def test_header_decoding_agrees_with_reference_for_every_header() -> None:
    longest = 0
    for b1 in range(256):
        for b2 in range(256):
            header = bytes([0xFF, b1, b2, 0x44])
            expected = ref_frame(header)
            assert probe_module._decode(header) == expected
            frame = probe_module._header(header[:3])
            if expected is None:
                assert frame is None
                continue
            length, samples, rate = expected
            assert probe_module._TICKS_PER_SECOND % rate == 0
            assert frame == (length, samples * probe_module._TICKS_PER_SECOND // rate)
            longest = max(longest, length)
    assert longest == probe_module._MAX_FRAME
    assert probe_module._header(b"\x00\xff\xfb") is None
    assert all(key[0] == 0xFF for key in probe_module._HEADERS)  # at most 65536 keys


@pytest.mark.parametrize("seed", range(5))
def test_integer_ticks_round_like_float_seconds(seed: int) -> None:
    ticks_per_s = probe_module._TICKS_PER_SECOND
    rnd = random.Random(seed)
    for _ in range(2000):
        total = 0
        seconds = 0.0
        for _ in range(rnd.randint(1, 300)):
            samples, rate = rnd.choice([(1152, 44100), (576, 16000), (576, 22050), (384, 8000)])
            total += samples * (ticks_per_s // rate)
            seconds += samples / rate
        assert probe_module._milliseconds(total) == round(seconds * 1000)
    # exact halves round to even, like round()
    assert probe_module._milliseconds(ticks_per_s // 2000) == 0
    assert probe_module._milliseconds(3 * ticks_per_s // 2000) == 2
    assert probe_module._milliseconds(ticks_per_s // 2000 + 1) == 1


@pytest.mark.parametrize("block", [None, 1000])
@pytest.mark.parametrize("offset", [-1, 0])
def test_first_frame_must_start_within_the_scan_limit(
    tmp_path: Path, cbr16k: bytes, blockwise: Callable[[int], None], block: int | None, offset: int
) -> None:
    # mutagen looks further (1 MiB) than the frame count does (64 KiB)
    if block is not None:
        blockwise(block)
    path = write(tmp_path, b"\0" * (probe_module._SCAN_LIMIT + offset) + cbr16k)
    expected = assert_agrees(path)
    if offset < 0:
        assert isinstance(expected, AudioInfo)
    else:
        assert expected == (Reason.INVALID_AUDIO, "no two consecutive MPEG frames found")
