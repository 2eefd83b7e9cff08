"""Breaks found by the third adversarial review (the bearer-token check and the speech
analysis), kept as regression tests; each failed before its fix."""

from __future__ import annotations

import struct

from fileserver.analysis import analyse
from fileserver.devstack.samples import make_mp3
from fileserver.probe import probe_bytes
from fileserver.serve.auth import Denied, TokenTable, token_hash


def test_a_token_that_is_not_utf8_is_denied_not_a_crash() -> None:
    # aiohttp hands header bytes that are not UTF-8 over as lone surrogates
    # (surrogateescape): "Authorization: Bearer \xff\xfe" arrives as this string
    table = TokenTable.parse([token_hash("right")])
    verdict = table.authorize("Bearer \udcff\udcfe", "read")
    assert isinstance(verdict, Denied) and verdict.status == 401


def _wav_header(rate: int) -> bytes:
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"WAVE"
        + b"fmt "
        + fmt
        + b"data"
        + struct.pack("<I", 0xFFFFFFFF)
    )


def test_the_analysis_measures_the_mp3_the_probe_accepted() -> None:
    # 44 bytes of RIFF/WAVE header in front of a 2 s MP3: the probe skips them as junk
    # before the first frame and accepts a 2 s MP3, but miniaudio tries WAV first and
    # decodes the whole file as 1 Hz PCM upsampled to 16 kHz, until max_seconds (600 s)
    mp3 = make_mp3(2.0, sample_rate=44100, channels=2, bitrate_kbps=128)
    hostile = _wav_header(1) + mp3
    info = probe_bytes(hostile)
    assert abs(info.duration_ms - 2038) < 100
    result = analyse(hostile)
    assert result.decoded_ms <= info.duration_ms + 1000, result
    assert result.leading_silence_ms <= info.duration_ms, result
