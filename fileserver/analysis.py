"""Speech analysis of one talk burst: levels, speech share, silences, clipping, ``empty``.

A push-to-talk channel carries many "kerchunks": the radio keyed up and nobody spoke
(a click, the squelch's hiss, a carrier tone, digital silence). :func:`analyse` tells
them from speech and measures the burst, for dispatchers who skip empty bursts and for
operators who spot a radio that always clips or keys up late.

How (all on the burst decoded to 16 kHz mono 16-bit, what Janus records, the format
the VAD takes; another rate or stereo is resampled/down-mixed by the decoder):

* decoded by miniaudio (dr_mp3) in blocks of :data:`BLOCK_FRAMES` samples, so the memory
  held is at most :data:`PENDING_BLOCKS` + 1 blocks (97 KB each) plus a few numbers
  per 30 ms frame, whatever the burst's length; decoding stops after ``max_seconds``. The
  decoder reads the recording in C (:func:`_blocks`): no Python callback runs inside a
  decode, and another thread may hold the GIL meanwhile;
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
  pauses inside words and phrases) count as speech. The VAD is stateful, so it is fed
  every frame in order, but only up to the last frame that passes gates 2 and 3: after
  it no frame can be speech, and a burst in which none passes them (silence, hiss,
  tones) needs no VAD at all. The gates are known once the whole burst is decoded; up
  to :data:`PENDING_BLOCKS` blocks (12 s) wait for them, a longer burst's first blocks
  go through the VAD as they come;
* ``speech_ratio`` is the share of the burst's frames that carry speech; leading and
  trailing silence are the times before the first and after the last speech frame;
  ``empty`` is less than ``min_speech_ms`` of speech in all, or no speech frame at all
  (``min_speech_ms`` 0), which then counts as none (an empty burst's speech ratio is 0,
  its leading and trailing silences its length).

:func:`analyse` is plain CPU work, mostly the MP3 decoder and the VAD (its cost per
second of audio: ``python -m bench.analysis_speed``); :class:`fileserver.analyzer.Analyzer`
runs it off the event loop, skips files over ``max_bytes`` and never fails an event: a
burst it cannot analyse is stored with its analysis columns ``NULL`` and logged.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

SAMPLE_RATE = 16_000  # what the VAD is fed (8/16/32/48 kHz allowed); Janus records 16 kHz
FRAME_MS = 30  # the VAD's longest frame: fewest calls, steadiest decision
FRAME = SAMPLE_RATE * FRAME_MS // 1000  # 480 samples
BLOCK_FRAMES = FRAME * 100  # 3 s decoded at a time: 96 KB of int16
#: Blocks whose frames wait for the VAD until the burst's levels are known (12 s: most
#: bursts are heard by the VAD only up to their last loud frame; see the module's doc).
PENDING_BLOCKS = 4
#: A spooled file up to this size is read into memory and decoded from there, like
#: bytes (the worker analyses files up to ``FILESERVER_ANALYSIS_MAX_BYTES``, 4 MiB by
#: default); a larger one is decoded from the file by miniaudio's own (C) reads.
IN_MEMORY_BYTES = 4 * 1024 * 1024
FULL_SCALE = 32768.0
#: Reported for digital silence (log of zero); below any real recording's noise floor
#: (one LSB of 16-bit audio is -90.3 dBFS).
FLOOR_DBFS = -120.0
#: Gaps up to this many frames (210 ms) between speech frames count as speech.
BRIDGE_FRAMES = 7
NOISE_PERCENTILE = 10
#: A frame's mean square of samples scaled to [-1, 1] is its sum of int16 squares / this.
_FRAME_POWER = FRAME * FULL_SCALE**2


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
def _decoder_config() -> Any:
    """``ma_decoder_config *``: 16 kHz mono int16 out, MP3 in (built once: the decoder
    copies it, and each call into miniaudio releases and retakes the GIL)."""
    from miniaudio import ffi, lib

    config = ffi.new(
        "ma_decoder_config *", lib.ma_decoder_config_init(lib.ma_format_s16, 1, SAMPLE_RATE)
    )
    config.encodingFormat = lib.ma_encoding_format_mp3
    return config


def _blocks(content: bytes | Path, max_samples: int) -> Iterator[Any]:
    """The burst's first ``max_samples`` samples of 16 kHz mono, decoded as MP3 only, in
    order, as int16 numpy arrays of whole 30 ms frames (the last may end with, or be, a
    partial frame), at most :data:`BLOCK_FRAMES` + :data:`FRAME` samples each; each its own
    memory, so a caller may keep a few.

    The decoder is miniaudio's (``ma_decoder``: dr_mp3, then conversion to 16 kHz mono
    16-bit, also of frames whose format differs from the first's), called through cffi
    on the recording in memory (a spooled file over :data:`IN_MEMORY_BYTES`: read by
    miniaudio's C file reads): no Python callback runs inside a decode, and cffi releases
    the GIL around each call. Before, miniaudio streamed the recording through a Python
    ``StreamableSource`` (~90 read/seek callbacks per 9 KB burst, each waiting for the
    GIL: ``python -m bench.analysis_gil``). It is asked for :data:`BLOCK_FRAMES` samples
    per call, as before: where the format changes mid-file, what the converter returns
    depends on the size of the reads. The samples are the stream's (tested against
    fab2923: tests/unit/test_analysis_reference.py), with one intended difference: dr_mp3
    now knows the file's length and sets a trailing ID3v1 (or APE) tag aside, where the
    stream read it as data: before an ID3v1 tag, it lost the last MP3 frame.

    The decoder is told the format: left to guess, miniaudio tried WAV first, so a RIFF
    header in front of a real MP3 (which the probe skips as junk and accepts) was decoded
    as 1 Hz PCM up to the duration limit, and a speech burst stored as ``empty``.

    Decoded a block at a time, never in one call: a one-call decode (``mp3_read_s16``)
    took the first frame's format for the whole file and decoded all of a hostile 64 KiB
    (free-format frames: 180 s of PCM) before ``max_seconds`` could cut it."""
    import numpy as np
    from miniaudio import ffi, lib

    config = _decoder_config()
    decoder = ffi.new("ma_decoder *")
    if isinstance(content, Path) and content.stat().st_size > IN_MEMORY_BYTES:
        result = lib.ma_decoder_init_file(os.fsencode(content), config, decoder)
    else:
        data = content.read_bytes() if isinstance(content, Path) else content
        source = ffi.from_buffer(data)  # the decoder reads it until uninit: keep it
        result = lib.ma_decoder_init_memory(source, len(data), config, decoder)
    if result != lib.MA_SUCCESS:
        raise AnalysisError(f"cannot decode: not MP3 audio (miniaudio error {result})")
    try:
        read = ffi.new("ma_uint64 *")
        carry: Any = ()  # the partial frame at the end of the previous block
        total = 0
        while total < max_samples:
            block = np.empty(FRAME + BLOCK_FRAMES, dtype=np.int16)
            held = len(carry)
            block[:held] = carry
            result = lib.ma_decoder_read_pcm_frames(
                decoder, ffi.from_buffer("int16_t[]", block) + held, BLOCK_FRAMES, read
            )
            if result == lib.MA_AT_END or (result == lib.MA_SUCCESS and not read[0]):
                break
            if result != lib.MA_SUCCESS:
                raise AnalysisError(f"cannot decode: miniaudio error {result}")
            new = min(read[0], max_samples - total)
            total += new
            held += new
            whole = held // FRAME * FRAME
            if whole:
                yield block[:whole]
            carry = block[whole:held]
        if len(carry):
            yield carry
    finally:
        lib.ma_decoder_uninit(decoder)


def analyse(
    content: bytes | Path, config: AnalysisConfig | None = None, *, expected_ms: int | None = None
) -> Analysis:
    """Decode one recording and measure it (CPU only; see the module's docstring).

    ``expected_ms``: the duration the probe read. A decoder that stops at less than half
    of it (and over a second short) raises :class:`AnalysisError` instead of measuring
    the part it saw: dr_mp3 believes an Info/Xing frame count, so audio appended after
    a counted file went unheard and a burst with speech was stored ``empty``.

    Every figure is computed as before the decode moved into C (fab2923; the test is
    tests/unit/test_analysis_reference.py): integer peak, clip count and sums of squares
    (a frame's sum of int16 squares is an integer below 2**39, exact in float64 whatever
    the order of the additions), the same float64 operations on the same frame powers
    for the levels, and numpy's linear percentile for the noise floor
    (:func:`_percentile`)."""
    import numpy as np
    import webrtcvad

    cfg = config or AnalysisConfig()
    vad = _Vad(webrtcvad, cfg.vad_mode)
    clip_level = int(FULL_SCALE * 10 ** (cfg.clip_dbfs / 20.0))
    max_samples = int(cfg.max_seconds * SAMPLE_RATE)
    peak = clipped = total = sum_squares = 0
    sums: list[Any] = []  # per-frame sums of squares, one array per block
    voiced: list[Any] = []  # the VAD's decisions, one array per block decided
    pending: list[Any] = []  # blocks of frames the VAD has not seen yet
    waiting = 0  # frames in them
    for x in _blocks(content, max_samples):
        total += len(x)
        top = max(int(x.max()), -int(x.min()))  # in Python ints: -(-32768) fits
        peak = max(peak, top)
        if clip_level <= 0:  # a level under one LSB: every sample is "at or above"
            clipped += len(x)
        elif top >= clip_level:
            clipped += int(np.count_nonzero(x >= clip_level))
            clipped += int(np.count_nonzero(x <= -clip_level))
        whole = len(x) // FRAME * FRAME
        frames = x[:whole].reshape(-1, FRAME)
        # int16 squares overflow: summed in float64 (exact), cast in einsum's small buffers
        frame_sums = np.einsum("ij,ij->i", frames, frames, dtype=np.float64)
        sum_squares += int(frame_sums.sum())
        if whole < len(x):  # the last block's partial frame counts in the RMS level
            tail = x[whole:].astype(np.int64)
            sum_squares += int(np.dot(tail, tail))
        sums.append(frame_sums)
        pending.append(frames)
        waiting += len(frames)
        if waiting > PENDING_BLOCKS * BLOCK_FRAMES // FRAME:  # bounded: decide the oldest
            oldest = pending.pop(0)
            waiting -= len(oldest)
            voiced.append(vad.decide(oldest, len(oldest)))
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
    power = (np.concatenate(sums) if len(sums) > 1 else sums[0]) / _FRAME_POWER
    where = np.zeros(0, dtype=np.intp)
    if len(power):
        level_db = 10.0 * np.log10(np.maximum(power, 1e-12))
        floor_db = _percentile(level_db, NOISE_PERCENTILE)
        loud = (level_db >= cfg.min_dbfs) & (level_db >= floor_db + cfg.snr_db)
        where = np.flatnonzero(loud)
        if len(where):  # the VAD sees every frame in order up to the last loud one
            end = int(where[-1]) + 1
            decided = len(power) - waiting
            for frames in pending:
                if decided >= end:
                    break
                voiced.append(vad.decide(frames, min(len(frames), end - decided)))
                decided += len(frames)
            decisions = np.concatenate(voiced) if len(voiced) > 1 else voiced[0]
            where = where[decisions[where]]
    speech_frames = _bridged(where, BRIDGE_FRAMES)
    empty = speech_frames == 0 or speech_frames * FRAME_MS < cfg.min_speech_ms
    if empty:  # too little to be speech (a click the VAD took for a voice): none at all
        speech_frames = 0
        leading = trailing = decoded_ms
    else:
        leading = int(where[0]) * FRAME_MS
        trailing = max(0, decoded_ms - (int(where[-1]) + 1) * FRAME_MS)
    return Analysis(
        peak_dbfs=_dbfs((peak / FULL_SCALE) ** 2),
        rms_dbfs=_dbfs(sum_squares / total / FULL_SCALE**2),
        speech_ratio=round(speech_frames / len(power), 4) if len(power) else 0.0,
        leading_silence_ms=leading,
        trailing_silence_ms=trailing,
        clipped_ratio=round(clipped / total, 6),
        empty=empty,
        decoded_ms=decoded_ms,
    )


class _Vad:
    """One burst's WebRTC VAD (stateful: it is fed the burst's frames in order).

    Calls the extension's ``process`` directly with rows of int16 frames (webrtcvad's
    ``Vad.is_speech`` adds a Python call and a length check per 30 ms frame, and wants
    ``bytes``: one copy each); the pinned webrtcvad-wheels is tested through it."""

    def __init__(self, webrtcvad: Any, mode: int) -> None:
        self._owner = webrtcvad.Vad(mode)
        self._handle = self._owner._vad
        self._process = webrtcvad._webrtcvad.process

    def decide(self, frames: Any, count: int) -> Any:
        """Speech or not for the first ``count`` rows of ``frames`` (bool array)."""
        import numpy as np

        decisions = map(
            self._process, repeat(self._handle), repeat(SAMPLE_RATE), frames, repeat(FRAME)
        )
        return np.fromiter(decisions, dtype=bool, count=count)


def _percentile(values: Any, q: int) -> float:
    """``np.percentile(values, q)`` (the default linear method), to the same float:
    numpy's index and weight arithmetic on the two order statistics it needs, found by
    ``np.partition`` (``np.percentile`` cost 40 us a burst, most of it overhead)."""
    import numpy as np

    n = len(values)
    virtual = (n - 1) * (q / 100)
    if virtual >= n - 1:
        return float(np.max(values))
    below = math.floor(virtual)
    weight = virtual - below
    ordered = np.partition(values, (below, below + 1))
    a, b = float(ordered[below]), float(ordered[below + 1])
    if weight >= 0.5:
        return b - (b - a) * (1 - weight)
    return a + (b - a) * weight


def _bridged(where: Any, gap: int) -> int:
    """How many frames are speech when runs of at most ``gap`` non-speech frames between
    two speech frames (at the sorted indices ``where``) count as speech."""
    import numpy as np

    if len(where) < 2:
        return len(where)
    gaps = np.diff(where) - 1
    return len(where) + int(gaps[(gaps > 0) & (gaps <= gap)].sum())
