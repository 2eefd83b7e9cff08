"""Reading a recording as MPEG audio with mutagen. No network I/O.

Note: mutagen estimates the length of a CBR file without a Xing/LAME header from its
size (it overstates by the encoder delay, 80-190 ms), and of a VBR file without a Xing
header from its first frame, which can be far off. The recorded duration is mutagen's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mutagen import MutagenError
from mutagen.mp3 import MP3

from fileserver.errors import PermanentError, Reason


@dataclass(frozen=True)
class AudioInfo:
    """What the probe learnt about a recording."""

    duration_ms: int
    bitrate: int
    sample_rate: int
    channels: int


def probe(path: Path) -> AudioInfo:
    """Read ``path`` as MPEG audio or raise ``PermanentError(invalid_audio)``."""
    try:
        audio = MP3(path)  # type: ignore[no-untyped-call]
    except (MutagenError, OSError, ValueError, EOFError) as exc:
        raise PermanentError(Reason.INVALID_AUDIO, f"not MPEG audio: {exc}") from None
    info: Any = audio.info
    if info is None:
        raise PermanentError(Reason.INVALID_AUDIO, "no MPEG stream information")
    if info.sample_rate <= 0 or info.channels <= 0:
        raise PermanentError(Reason.INVALID_AUDIO, "MPEG header without sample rate or channels")
    return AudioInfo(
        duration_ms=round(info.length * 1000),
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
