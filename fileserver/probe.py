"""Reading a recording as MPEG audio with mutagen, plus an exact frame count. No network I/O.

mutagen identifies the stream (MPEG version, layer, sample rate, channels, bitrate)
but estimates the length: from the file size for CBR files without a Xing/LAME header
(overstated by the encoder delay) and from the first frame for VBR files without one
(a 3 s clip read as 0.5 s). So the duration is computed by walking the MPEG frame
headers from the first frame to the end: ``frames * samples_per_frame / sample_rate``.
A file whose last frame is cut short is rejected as truncated.

The probe runs once per event, so it is written for CPU per file:

* a file of up to ``_IN_MEMORY`` bytes (every talk burst) is opened and read once;
  mutagen parses an in-memory copy and the walk runs over the same bytes. Larger files
  are walked in ``_BLOCK``-sized reads.
* frame headers are decoded once per distinct header and memoised (``_HEADERS``): the
  3 bytes that matter repeat, in CBR only the padding bit changes.
* the duration is summed as integer ticks of ``1 / _TICKS_PER_SECOND`` s, a common
  multiple of every MPEG sample rate, so it is exact and costs one integer add a frame.
* a run of frames with the same header (CBR) is checked with strided slices in C
  rather than one header at a time (``_run_length``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mutagen import MutagenError
from mutagen.mp3 import MP3, MPEGInfo

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
_TICKS_PER_SECOND = 14_112_000  # lcm of the nine sample rates above
_MAX_FRAME = 2881  # the longest frame: MPEG-2.5 layer II, 160 kbps at 8 kHz, padded
_SCAN_LIMIT = 64 * 1024  # how far past the ID3 tag the first frame may start
_IN_MEMORY = 1024 * 1024  # files up to this size are read whole and walked in memory
_BLOCK = 1024 * 1024  # read size of the walk through larger files
_RUN_WINDOW = 256  # frames one _run_length call checks at most
_RUN_AFTER = 2  # repeats of a header before a run is tried, doubled when runs are short
_RUN_WORTH = 8  # a run shorter than this did not pay for the slicing

# The first 3 bytes of a header -> (frame length, ticks), or None when they are not a
# header. Only keys starting with 0xFF are stored, so it holds at most 65536 entries.
_HEADERS: dict[bytes, tuple[int, int] | None] = {}


@dataclass(frozen=True)
class AudioInfo:
    """What the probe learnt about a recording."""

    duration_ms: int
    bitrate: int
    sample_rate: int
    channels: int


def _decode(header: bytes) -> tuple[int, int, int] | None:
    """``(length, samples, sample_rate)`` of an MPEG audio frame header, or ``None``.

    Only the first 3 bytes are read; the fourth (channel mode, emphasis) does not change
    the frame's length or duration.
    """
    if len(header) < 3 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
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
        return (12 * bitrate // sample_rate + padding) * 4, 384, sample_rate
    samples = 1152 if layer == 2 or mpeg1 else 576
    return samples // 8 * bitrate // sample_rate + padding, samples, sample_rate


def _header(key: bytes) -> tuple[int, int] | None:
    """``(length, ticks)`` of the frame whose header starts with the 3 bytes ``key``."""
    try:
        return _HEADERS[key]
    except KeyError:
        pass
    decoded = _decode(key)
    frame = None if decoded is None else (decoded[0], decoded[1] * _TICKS_PER_SECOND // decoded[2])
    if key[:1] == b"\xff":
        _HEADERS[key] = frame
    return frame


def _id3_size(head: bytes) -> int:
    """Bytes taken by an ID3v2 tag at the start of the file (``head``: its first 10)."""
    if len(head) == 10 and head[:3] == b"ID3":
        size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
        return 10 + size + (10 if head[5] & 0x10 else 0)
    return 0


def _first_frame(data: bytes, start: int) -> int | None:
    """Offset in ``data`` of the first header within ``_SCAN_LIMIT`` bytes of ``start`` that
    is followed by a second valid header.

    ``data`` must hold the file from ``start`` on, at least ``_SCAN_LIMIT + 8 + _MAX_FRAME``
    bytes of it unless the file ends sooner.
    """
    stop = min(len(data) - start, _SCAN_LIMIT + 4) - 4 + start  # headers start before it
    pos = data.find(b"\xff", start, stop)
    while pos >= 0:
        frame = _header(data[pos : pos + 3])
        if frame is not None:
            second = pos + frame[0]
            if second + 4 <= len(data) and _header(data[second : second + 3]) is not None:
                return pos
        pos = data.find(b"\xff", pos + 1, stop)
    return None


def _run_length(buf: bytes, pos: int, stop: int, length: int, key: bytes) -> int:
    """How many of the frames at ``pos``, ``pos + length``, ... before ``stop`` (at most
    ``_RUN_WINDOW``) start with the header bytes ``key``, counted without a gap."""
    count = _RUN_WINDOW
    for i in range(3):
        column = buf[pos + i : stop + i : length]  # byte i of each of those headers
        count = min(count, len(column) - len(column.lstrip(key[i : i + 1])))
    return count


def _walk(buf: bytes, pos: int, limit: int, base: int) -> tuple[int, int, bool]:
    """Walk the frames of ``buf`` from ``pos`` while a whole header is in ``buf``.

    ``buf`` starts at byte ``base`` of the file and ``limit`` is the file's size counted
    from there. Returns the offset in ``buf`` after the last frame (past its end when
    that frame continues in the next block), the ticks of the frames walked and whether
    the walk stopped at something that is not a frame header. Raises ``invalid_audio``
    when the last frame walked runs past the end of the file.
    """
    end = len(buf)
    last = end - 4
    headers = _HEADERS.get
    ticks = 0
    length = 0
    previous: tuple[int, int] | None = None
    repeats = 0
    run_after = _RUN_AFTER
    while pos <= last:
        key = buf[pos : pos + 3]
        frame = headers(key)
        if frame is None:
            frame = _header(key)
            if frame is None:
                return pos, ticks, True  # trailing data: ID3v1 / APE tag, or junk
        length, frame_ticks = frame
        if frame is not previous:
            previous = frame
            repeats = 0
        elif repeats < run_after:
            repeats += 1
        else:  # the same header again and again (CBR): check a run of them at once
            count = _run_length(buf, pos, min(end - 3, pos + length * _RUN_WINDOW), length, key)
            if count < _RUN_WORTH:
                run_after = min(2 * run_after, 64)
            repeats = 0
            ticks += count * frame_ticks
            pos += count * length
            continue
        ticks += frame_ticks
        pos += length
    if pos > limit:
        start = pos - length
        raise PermanentError(
            Reason.INVALID_AUDIO,
            f"truncated: the frame at byte {base + start} needs {length} bytes, "
            f"the file ends after {limit - start}",
        )
    return pos, ticks, False


def _milliseconds(ticks: int) -> int:
    """``ticks`` in ms, rounded half to even like ``round()``."""
    ms, rest = divmod(ticks * 1000, _TICKS_PER_SECOND)
    if 2 * rest > _TICKS_PER_SECOND or (2 * rest == _TICKS_PER_SECOND and ms & 1):
        ms += 1
    return ms


def _no_frames() -> PermanentError:
    return PermanentError(Reason.INVALID_AUDIO, "no two consecutive MPEG frames found")


def _count_in_memory(data: bytes) -> int:
    start = _first_frame(data, _id3_size(data[:10]))
    if start is None:
        raise _no_frames()
    _, ticks, _ = _walk(data, start, len(data), 0)
    return _milliseconds(ticks)


def _count_blockwise(f: BinaryIO, size: int) -> int:
    f.seek(0)
    start = _id3_size(f.read(10))
    f.seek(start)
    found = _first_frame(f.read(_SCAN_LIMIT + 8 + _MAX_FRAME), 0)
    if found is None:
        raise _no_frames()
    base = start + found  # file offset of the next frame header
    ticks = 0
    while base + 4 <= size:
        f.seek(base)
        buf = f.read(_BLOCK)
        pos, block_ticks, stopped = _walk(buf, 0, size - base, base)
        ticks += block_ticks
        base += pos
        if stopped or pos == 0:  # pos == 0: the file is shorter than it was
            break
    return _milliseconds(ticks)


def _count(f: BinaryIO) -> int:
    size = os.fstat(f.fileno()).st_size
    if size <= _IN_MEMORY:
        return _count_in_memory(f.read())
    return _count_blockwise(f, size)


def count_duration_ms(path: Path) -> int:
    """Exact duration from the frame headers; raises ``invalid_audio`` when truncated."""
    with open(path, "rb") as f:
        return _count(f)


class _NamedBytesIO(io.BytesIO):
    """The file's bytes under its name, which mutagen puts in some of its messages."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name


def _mpeg_info(data: bytes, name: str) -> Any:
    """``MP3(...).info`` for a file whose bytes are ``data``."""
    fileobj = _NamedBytesIO(data, name)
    if data[:3] != b"ID3" and b"TAG" not in data[-131:]:
        # Without an ID3v2 header, and without "TAG" where ID3 looks for an ID3v1 tag,
        # MP3() finds no tags and does exactly this; its tag lookup costs as much again.
        return MPEGInfo(fileobj)
    return MP3(fileobj).info  # type: ignore[no-untyped-call]


def _check_stream(info: Any) -> None:
    """Refuse a stream mutagen could not describe (before walking its frames)."""
    if info is None or info.sample_rate <= 0 or info.channels <= 0:
        raise PermanentError(Reason.INVALID_AUDIO, "MPEG header without sample rate or channels")


def _audio_info(info: Any, duration_ms: int) -> AudioInfo:
    return AudioInfo(
        duration_ms=duration_ms,
        bitrate=int(info.bitrate),
        sample_rate=int(info.sample_rate),
        channels=int(info.channels),
    )


def probe_bytes(data: bytes, name: str = "<memory>") -> AudioInfo:
    """Read ``data`` (a whole file, named ``name`` in messages) as MPEG audio or raise
    ``PermanentError(invalid_audio)``."""
    try:
        info: Any = _mpeg_info(data, name)
    except (MutagenError, OSError, ValueError, EOFError) as exc:
        raise PermanentError(Reason.INVALID_AUDIO, f"not MPEG audio: {exc}") from None
    _check_stream(info)
    return _audio_info(info, _count_in_memory(data))


def probe(path: Path) -> AudioInfo:
    """Read ``path`` as MPEG audio or raise ``PermanentError(invalid_audio)``."""
    name = os.fspath(path)  # what mutagen would open, and name in its messages
    try:
        f = open(name, "rb")  # noqa: SIM115 - closed below, after the walk
    except OSError as exc:
        raise PermanentError(Reason.INVALID_AUDIO, f"not MPEG audio: {exc}") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            data = f.read() if size <= _IN_MEMORY else None
        except OSError as exc:
            raise PermanentError(Reason.INVALID_AUDIO, f"not MPEG audio: {exc}") from None
        if data is not None:
            return probe_bytes(data, name)
        try:
            info: Any = MP3(f).info  # type: ignore[no-untyped-call]
        except (MutagenError, OSError, ValueError, EOFError) as exc:
            raise PermanentError(Reason.INVALID_AUDIO, f"not MPEG audio: {exc}") from None
        _check_stream(info)
        return _audio_info(info, _count_blockwise(f, size))


def check_duration(info: AudioInfo, max_duration_s: int) -> None:
    """Raise ``duration_out_of_range`` unless 0 < duration <= the configured maximum."""
    if info.duration_ms <= 0:
        raise PermanentError(Reason.DURATION_OUT_OF_RANGE, "duration is 0 ms")
    if info.duration_ms > max_duration_s * 1000:
        raise PermanentError(
            Reason.DURATION_OUT_OF_RANGE,
            f"duration {info.duration_ms} ms exceeds FILESERVER_MAX_DURATION_S={max_duration_s}",
        )
