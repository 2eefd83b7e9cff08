"""Reading a recording as MPEG audio with mutagen, plus an exact frame count. No network I/O.

mutagen identifies the stream (MPEG version, layer, sample rate, channels, bitrate)
but estimates the length: from the file size for CBR files without a Xing/LAME header
(overstated by the encoder delay) and from the first frame for VBR files without one
(a 3 s clip read as 0.5 s). So the duration is computed by walking the MPEG frame
headers from the first frame to the end: ``frames * samples_per_frame / sample_rate``.
A file whose last frame is cut short is rejected as truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mutagen import MutagenError
from mutagen.mp3 import MP3

from fileserver.errors import PermanentError, Reason

# Bitrates in kbps by [version is MPEG-1][layer][index]; sample rates by [version][index].
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_SCAN_LIMIT = 64 * 1024  # how far past the ID3 tag the first frame may start
_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class AudioInfo:
    """What the probe learnt about a recording."""

    duration_ms: int
    bitrate: int
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class _Frame:
    length: int
    samples: int
    sample_rate: int


def _frame(header: bytes) -> _Frame | None:
    """Decode a 4-byte MPEG audio frame header, or ``None`` if it is not one."""
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version = (header[1] >> 3) & 0x3  # 3 = MPEG-1, 2 = MPEG-2, 0 = MPEG-2.5
    layer = 4 - ((header[1] >> 1) & 0x3)  # 1, 2 or 3
    bitrate_index = header[2] >> 4
    sr_index = (header[2] >> 2) & 0x3
    if version == 1 or layer == 4 or bitrate_index in (0, 15) or sr_index == 3:
        return None
    padding = (header[2] >> 1) & 0x1
    mpeg1 = version == 3
    bitrate = _BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    sample_rate = _SAMPLE_RATES[version][sr_index]
    if layer == 1:
        return _Frame((12 * bitrate // sample_rate + padding) * 4, 384, sample_rate)
    samples = 1152 if layer == 2 or mpeg1 else 576
    return _Frame(samples // 8 * bitrate // sample_rate + padding, samples, sample_rate)


def _skip_id3(f: BinaryIO) -> int:
    head = f.read(10)
    if len(head) == 10 and head[:3] == b"ID3":
        size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
        return 10 + size + (10 if head[5] & 0x10 else 0)
    return 0


def _first_frame(f: BinaryIO, start: int) -> int | None:
    """Offset of the first header followed by a second valid header."""
    f.seek(start)
    window = f.read(_SCAN_LIMIT + 4)
    pos = window.find(b"\xff")
    while 0 <= pos < len(window) - 4:
        frame = _frame(window[pos : pos + 4])
        if frame is not None:
            f.seek(start + pos + frame.length)
            if _frame(f.read(4)) is not None:
                return start + pos
        pos = window.find(b"\xff", pos + 1)
    return None


def count_duration_ms(path: Path) -> int:
    """Exact duration from the frame headers; raises ``invalid_audio`` when truncated."""
    size = path.stat().st_size
    with path.open("rb") as f:
        start = _first_frame(f, _skip_id3(f))
        if start is None:
            raise PermanentError(Reason.INVALID_AUDIO, "no two consecutive MPEG frames found")
        seconds = 0.0
        f.seek(start)
        buf = f.read(_BLOCK)
        base = start  # file offset of buf[0]
        pos = 0  # offset in buf of the next frame header
        while base + pos + 4 <= size:
            if pos + 4 > len(buf):
                base += pos
                pos = 0
                f.seek(base)
                buf = f.read(_BLOCK)
            frame = _frame(buf[pos : pos + 4])
            if frame is None:
                break  # trailing data: ID3v1 / APE tag, or junk after the audio
            if base + pos + frame.length > size:
                raise PermanentError(
                    Reason.INVALID_AUDIO,
                    f"truncated: the frame at byte {base + pos} needs {frame.length} bytes, "
                    f"the file ends after {size - base - pos}",
                )
            seconds += frame.samples / frame.sample_rate
            pos += frame.length
    return round(seconds * 1000)


def probe(path: Path) -> AudioInfo:
    """Read ``path`` as MPEG audio or raise ``PermanentError(invalid_audio)``."""
    try:
        audio = MP3(path)  # type: ignore[no-untyped-call]
    except (MutagenError, OSError, ValueError, EOFError) as exc:
        raise PermanentError(Reason.INVALID_AUDIO, f"not MPEG audio: {exc}") from None
    info: Any = audio.info
    if info is None or info.sample_rate <= 0 or info.channels <= 0:
        raise PermanentError(Reason.INVALID_AUDIO, "MPEG header without sample rate or channels")
    return AudioInfo(
        duration_ms=count_duration_ms(path),
        bitrate=int(info.bitrate),
        sample_rate=int(info.sample_rate),
        channels=int(info.channels),
    )


def check_duration(info: AudioInfo, max_duration_s: int) -> None:
    """Raise ``duration_out_of_range`` unless 0 < duration <= the configured maximum."""
    if info.duration_ms <= 0:
        raise PermanentError(Reason.DURATION_OUT_OF_RANGE, "duration is 0 ms")
    if info.duration_ms > max_duration_s * 1000:
        raise PermanentError(
            Reason.DURATION_OUT_OF_RANGE,
            f"duration {info.duration_ms} ms exceeds FILESERVER_MAX_DURATION_S={max_duration_s}",
        )
