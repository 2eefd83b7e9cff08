"""Speech analysis of one talk burst: levels, speech share, silences, clipping, ``empty``.

A push-to-talk channel carries many "kerchunks": the radio keyed up and nobody spoke
(a click, the squelch's hiss, a carrier tone, digital silence). :func:`analyse` tells
them from speech and measures the burst, for dispatchers who skip empty bursts and for
operators who spot a radio that always clips or keys up late.

How (all on the burst decoded to 16 kHz mono 16-bit, what Janus records, the format
the VAD takes; another rate or stereo is resampled/down-mixed by the decoder):

* decoded by miniaudio (dr_mp3) in blocks of :data:`BLOCK_FRAMES` samples, so the memory
  held is one block plus one number per 30 ms frame, whatever the burst's length;
  decoding stops after ``max_seconds``;
* peak and RMS level of the whole burst in dBFS (0 dBFS = full scale; digital silence
  is reported as :data:`FLOOR_DBFS`); the share of samples at or above
  ``clip_dbfs`` (a clipped waveform decodes to plateaus just under full scale, the
  encoder's ripple, and to full-scale runs where the decoder clamps its overshoot);
* a 30 ms frame carries speech when all three hold:

  1. the WebRTC VAD (``webrtcvad``, a GMM over sub-band energies) says speech, at
     aggressiveness ``vad_mode`` (0-3, 3 the strictest);
  2. its level is at least ``min_dbfs`` (absolute gate: what is quieter is not a voice
     a dispatcher could hear over a radio channel);
  3. its level is at least ``snr_db`` above the burst's noise floor (the 10th
     percentile of its frame levels). The VAD alone calls steady hiss speech (measured:
     white and pink noise, 100 % of frames); speech rises and falls with syllables,
     tens of dB in a second, while hiss, hum and tones stay within a few dB of their
     own floor.

  Gaps of at most :data:`BRIDGE_FRAMES` frames between speech frames (the stops and
  pauses inside words and phrases) count as speech;
* ``speech_ratio`` is the share of the burst's frames that carry speech; leading and
  trailing silence are the times before the first and after the last speech frame;
  ``empty`` is less than ``min_speech_ms`` of speech in all, which then counts as none
  (an empty burst's speech ratio is 0, its leading and trailing silences its length).

:func:`analyse` is plain CPU work, mostly the MP3 decoder and the VAD (its cost per
second of audio: ``python -m bench.analysis_speed``); :class:`fileserver.analyzer.Analyzer`
runs it off the event loop, skips files over ``max_bytes`` and never fails an event: a
burst it cannot analyse is stored with its analysis columns ``NULL`` and logged.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # what the VAD is fed (8/16/32/48 kHz allowed); Janus records 16 kHz
FRAME_MS = 30  # the VAD's longest frame: fewest calls, steadiest decision
FRAME = SAMPLE_RATE * FRAME_MS // 1000  # 480 samples
BLOCK_FRAMES = FRAME * 100  # 3 s decoded at a time: 96 KB of int16
FULL_SCALE = 32768.0
#: Reported for digital silence (log of zero); below any real recording's noise floor
#: (one LSB of 16-bit audio is -90.3 dBFS).
FLOOR_DBFS = -120.0
#: Gaps up to this many frames (210 ms) between speech frames count as speech.
BRIDGE_FRAMES = 7
NOISE_PERCENTILE = 10


@dataclass(frozen=True)
class AnalysisConfig:
    """The thresholds of :func:`analyse` (``FILESERVER_ANALYSIS_*``; see
    :class:`fileserver.settings.Settings` for their defaults and why)."""

    vad_mode: int = 3
    min_dbfs: float = -50.0
    snr_db: float = 9.0
    min_speech_ms: int = 300
    clip_dbfs: float = -0.5
    max_seconds: float = 600.0


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyse` measured about one burst (the ``recordings`` columns)."""

    peak_dbfs: float
    rms_dbfs: float
    speech_ratio: float
    leading_silence_ms: int
    trailing_silence_ms: int
    clipped_ratio: float
    empty: bool
    #: Decoded length (ms), for messages; not stored (``duration_ms`` is the probe's).
    decoded_ms: int = 0


class AnalysisError(Exception):
    """The recording could not be decoded for analysis (the event is ingested anyway)."""


def _dbfs(power: float) -> float:
    """dBFS of a mean square of samples scaled to [-1, 1]."""
    if power <= 0.0:
        return FLOOR_DBFS
    return max(FLOOR_DBFS, round(10.0 * math.log10(power), 2))


@functools.cache
def _source_type() -> type:
    """miniaudio's stream source over a file object (built once: a class statement per
    burst cost more CPU than the VAD)."""
    import miniaudio

    class Source(miniaudio.StreamableSource):  # type: ignore[misc]
        def __init__(self, raw: IO[bytes]) -> None:
            self.raw = raw

        def read(self, num_bytes: int) -> bytes:
            return self.raw.read(num_bytes)

        def seek(self, offset: int, origin: Any) -> bool:
            whence = os.SEEK_CUR if origin == miniaudio.SeekOrigin.CURRENT else os.SEEK_SET
            self.raw.seek(offset, whence)
            return True

    return Source


def _blocks(content: bytes | Path) -> Iterator[Any]:
    """The burst as int16 blocks of 16 kHz mono (``array.array``), decoded as MP3 only.

    The decoder is told the format: left to guess, miniaudio tried WAV first, so a RIFF
    header in front of a real MP3 (which the probe skips as junk and accepts) was decoded
    as 1 Hz PCM up to the duration limit, and a speech burst stored as ``empty``.

    Always streamed, small bursts too: a one-call decode (``mp3_read_s16``) saved ~0.1 ms
    per 3 s burst but took the first frame's format for the whole file (a file that
    switches format mid-way measured differently) and decoded all of a hostile 64 KiB
    (free-format frames: 180 s of PCM) before ``max_seconds`` could cut it."""
    import miniaudio

    raw: IO[bytes] = content.open("rb") if isinstance(content, Path) else io.BytesIO(content)
    try:  # a decoding error is raised when iterated
        yield from miniaudio.stream_any(
            _source_type()(raw),
            source_format=miniaudio.FileFormat.MP3,
            output_format=miniaudio.SampleFormat.SIGNED16,
            nchannels=1,
            sample_rate=SAMPLE_RATE,
            frames_to_read=BLOCK_FRAMES,
        )
    finally:
        raw.close()


def analyse(
    content: bytes | Path, config: AnalysisConfig | None = None, *, expected_ms: int | None = None
) -> Analysis:
    """Decode one recording and measure it (CPU only; see the module's docstring).

    ``expected_ms``: the duration the probe read. A decoder that stops at less than half
    of it (and over a second short) raises :class:`AnalysisError` instead of measuring
    the part it saw: dr_mp3 believes an Info/Xing frame count, so audio appended after
    a counted file went unheard and a burst with speech was stored ``empty``."""
    import miniaudio
    import numpy as np
    import webrtcvad

    cfg = config or AnalysisConfig()
    vad = webrtcvad.Vad(cfg.vad_mode)
    clip_level = int(FULL_SCALE * 10 ** (cfg.clip_dbfs / 20.0))
    max_samples = int(cfg.max_seconds * SAMPLE_RATE)
    peak = clipped = total = sum_squares = 0
    levels: list[Any] = []  # per-frame mean squares, one array per block
    voiced: list[bool] = []
    carry = np.zeros(0, dtype=np.int16)
    is_speech = vad.is_speech
    step = FRAME * 2
    try:
        for block in _blocks(content):
            x = np.frombuffer(block, dtype=np.int16)
            if total + len(x) > max_samples:
                x = x[: max_samples - total]
            total += len(x)
            if len(x):  # in int16/int64: exact, and no float copies of the block
                peak = max(peak, int(x.max()), -int(x.min()))
                if clip_level <= 0:  # a level under one LSB: every sample is "at or above"
                    clipped += len(x)
                else:
                    clipped += int(np.count_nonzero(x >= clip_level))
                    clipped += int(np.count_nonzero(x <= -clip_level))
            new = len(x)
            x = np.concatenate((carry, x)) if len(carry) else x
            wide = x.astype(np.int64)  # int16 squares overflow; integer dot uses no BLAS
            fresh = wide[len(wide) - new :]
            sum_squares += int(np.dot(fresh, fresh))
            whole = len(x) // FRAME * FRAME
            frames = wide[:whole].reshape(-1, FRAME)
            levels.append(np.einsum("ij,ij->i", frames, frames) / (FRAME * FULL_SCALE**2))
            pcm = x[:whole].tobytes()
            voiced.extend(
                is_speech(pcm[i : i + step], SAMPLE_RATE) for i in range(0, whole * 2, step)
            )
            carry = x[whole:].copy()
            if total >= max_samples:
                break
    except miniaudio.MiniaudioError as exc:
        raise AnalysisError(f"cannot decode: {exc}") from None
    if total == 0:
        raise AnalysisError("no audio decoded")
    decoded_ms = total * 1000 // SAMPLE_RATE
    if expected_ms is not None and total < max_samples:
        expected = min(expected_ms, int(cfg.max_seconds * 1000))
        if decoded_ms * 2 < expected and expected - decoded_ms > 1000:
            raise AnalysisError(
                f"the decoder stopped at {decoded_ms} ms of the {expected_ms} ms the probe "
                "read (an Info/Xing frame count shorter than the audio?)"
            )
    power = np.concatenate(levels) if levels else np.zeros(0)
    speech = np.zeros(len(power), dtype=bool)
    if len(power):
        level_db = 10.0 * np.log10(np.maximum(power, 1e-12))
        floor_db = float(np.percentile(level_db, NOISE_PERCENTILE))
        speech = (
            np.array(voiced, dtype=bool)
            & (level_db >= cfg.min_dbfs)
            & (level_db >= floor_db + cfg.snr_db)
        )
        speech = _bridge(speech, BRIDGE_FRAMES)
    speech_frames = int(speech.sum())
    empty = speech_frames * FRAME_MS < cfg.min_speech_ms
    if empty:  # too little to be speech (a click the VAD took for a voice): none at all
        speech_frames = 0
        leading = trailing = decoded_ms
    else:
        where = np.flatnonzero(speech)
        leading = int(where[0]) * FRAME_MS
        trailing = max(0, decoded_ms - (int(where[-1]) + 1) * FRAME_MS)
    return Analysis(
        peak_dbfs=_dbfs((peak / FULL_SCALE) ** 2),
        rms_dbfs=_dbfs(sum_squares / total / FULL_SCALE**2),
        speech_ratio=round(speech_frames / len(speech), 4) if len(speech) else 0.0,
        leading_silence_ms=leading,
        trailing_silence_ms=trailing,
        clipped_ratio=round(clipped / total, 6),
        empty=empty,
        decoded_ms=decoded_ms,
    )


def _bridge(speech: Any, gap: int) -> Any:
    """``speech`` with runs of at most ``gap`` non-speech frames between speech frames
    filled in."""
    import numpy as np

    where = np.flatnonzero(speech)
    if len(where) < 2:
        return speech
    out = speech.copy()
    for start, end in itertools.pairwise(where):
        if 1 < end - start <= gap + 1:
            out[start:end] = True
    return out
