"""Micro-benchmark of :func:`fileserver.probe.probe`: ``python -m bench.probe_speed``.

Times the original implementation (copied below as the ``old_*`` baseline: mutagen
``MP3(path)``, then a second open that walks every frame header in Python building a
``_Frame`` per frame) against the current :func:`fileserver.probe.probe`:

* on 3 s clips: the Janus shape (16 kHz mono 24 kbps CBR, ~9 KB), a VBR sine (one
  bitrate almost throughout) and a speech-like VBR clip (the bitrate changes every few
  frames, the worst case for skipping runs of equal headers): CPU µs per call, the
  median of ``--repeats`` batches of ``--calls`` calls;
* on ~``--big-mb`` MB files (each clip back to back): MB/s, the median of
  ``--big-runs`` runs, the file in the page cache.

Times are process CPU time (user + system, ``time.process_time``), so other load on the
machine matters less than with wall time. Both implementations must return the same
result on every file or the benchmark fails. Prints a table and writes a JSON file
under ``bench/results/`` (gitignored). Needs ``lameenc`` (the ``[dev]`` extra).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import statistics
import struct
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from mutagen import MutagenError
from mutagen.mp3 import MP3

from fileserver.devstack.samples import make_mp3
from fileserver.errors import PermanentError, Reason
from fileserver.probe import AudioInfo, probe

RESULTS = Path(__file__).resolve().parent / "results"

# --- the baseline: fileserver/probe.py before the CPU work, verbatim but renamed -------

OLD_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
OLD_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
OLD_SCAN_LIMIT = 64 * 1024
OLD_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class OldFrame:
    length: int
    samples: int
    sample_rate: int


def old_frame(header: bytes) -> OldFrame | None:
    if len(header) < 4 or header[0] != 0xFF or header[1] & 0xE0 != 0xE0:
        return None
    version = (header[1] >> 3) & 0x3
    layer = 4 - ((header[1] >> 1) & 0x3)
    bitrate_index = header[2] >> 4
    sr_index = (header[2] >> 2) & 0x3
    if version == 1 or layer == 4 or bitrate_index in (0, 15) or sr_index == 3:
        return None
    padding = (header[2] >> 1) & 0x1
    mpeg1 = version == 3
    bitrate = OLD_BITRATES[(mpeg1, layer)][bitrate_index] * 1000
    sample_rate = OLD_SAMPLE_RATES[version][sr_index]
    if layer == 1:
        return OldFrame((12 * bitrate // sample_rate + padding) * 4, 384, sample_rate)
    samples = 1152 if layer == 2 or mpeg1 else 576
    return OldFrame(samples // 8 * bitrate // sample_rate + padding, samples, sample_rate)


def old_skip_id3(f: BinaryIO) -> int:
    head = f.read(10)
    if len(head) == 10 and head[:3] == b"ID3":
        size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
        return 10 + size + (10 if head[5] & 0x10 else 0)
    return 0


def old_first_frame(f: BinaryIO, start: int) -> int | None:
    f.seek(start)
    window = f.read(OLD_SCAN_LIMIT + 4)
    pos = window.find(b"\xff")
    while 0 <= pos < len(window) - 4:
        frame = old_frame(window[pos : pos + 4])
        if frame is not None:
            f.seek(start + pos + frame.length)
            if old_frame(f.read(4)) is not None:
                return start + pos
        pos = window.find(b"\xff", pos + 1)
    return None


def old_count_duration_ms(path: Path) -> int:
    size = path.stat().st_size
    with path.open("rb") as f:
        start = old_first_frame(f, old_skip_id3(f))
        if start is None:
            raise PermanentError(Reason.INVALID_AUDIO, "no two consecutive MPEG frames found")
        seconds = 0.0
        f.seek(start)
        buf = f.read(OLD_BLOCK)
        base = start
        pos = 0
        while base + pos + 4 <= size:
            if pos + 4 > len(buf):
                base += pos
                pos = 0
                f.seek(base)
                buf = f.read(OLD_BLOCK)
            frame = old_frame(buf[pos : pos + 4])
            if frame is None:
                break
            if base + pos + frame.length > size:
                raise PermanentError(
                    Reason.INVALID_AUDIO,
                    f"truncated: the frame at byte {base + pos} needs {frame.length} bytes, "
                    f"the file ends after {size - base - pos}",
                )
            seconds += frame.samples / frame.sample_rate
            pos += frame.length
    return round(seconds * 1000)


def old_probe(path: Path) -> AudioInfo:
    try:
        audio = MP3(path)  # type: ignore[no-untyped-call]
    except (MutagenError, OSError, ValueError, EOFError) as exc:
        raise PermanentError(Reason.INVALID_AUDIO, f"not MPEG audio: {exc}") from None
    info: Any = audio.info
    if info is None or info.sample_rate <= 0 or info.channels <= 0:
        raise PermanentError(Reason.INVALID_AUDIO, "MPEG header without sample rate or channels")
    return AudioInfo(
        duration_ms=old_count_duration_ms(path),
        bitrate=int(info.bitrate),
        sample_rate=int(info.sample_rate),
        channels=int(info.channels),
    )


# --- measuring -------------------------------------------------------------------------

IMPLEMENTATIONS: dict[str, Callable[[Path], AudioInfo]] = {"old": old_probe, "new": probe}


def cpu_seconds(path: Path, calls: int, repeats: int) -> tuple[float, float]:
    """Median CPU seconds of ``calls`` calls of the old and the new probe on ``path``, over
    ``repeats`` batches of each; the batches alternate so that load drift hits both."""
    timers = [
        timeit.Timer(functools.partial(fn, path), timer=time.process_time)
        for fn in IMPLEMENTATIONS.values()
    ]
    batches: list[list[float]] = [[], []]
    for _ in range(repeats):
        for timer, times in zip(timers, batches, strict=True):
            times.append(timer.timeit(number=calls))
    return statistics.median(batches[0]), statistics.median(batches[1])


def speechlike_mp3(seconds: float, sample_rate: int = 16000) -> bytes:
    """VBR mono MP3 of tone bursts and pauses of random pitch and level, so that the
    frame bitrate keeps changing (``make_mp3``'s steady sine is CBR-like even as VBR)."""
    import lameenc

    rnd = random.Random(5)
    pcm: list[int] = []
    freq, level = 440.0, 8000
    for i in range(int(seconds * sample_rate)):
        if i % 2000 == 0:
            freq, level = rnd.uniform(100, 3000), rnd.choice([0, 500, 4000, 12000])
        pcm.append(
            int(level * math.sin(2 * math.pi * freq * i / sample_rate)) + rnd.randint(-300, 300)
        )
    enc = lameenc.Encoder()
    enc.set_in_sample_rate(sample_rate)
    enc.set_channels(1)
    enc.set_quality(7)
    enc.set_vbr(4)
    enc.set_vbr_quality(4)
    data = enc.encode(struct.pack(f"<{len(pcm)}h", *pcm)) + enc.flush()
    return bytes(data)


def same_result(path: Path) -> AudioInfo:
    results = {name: fn(path) for name, fn in IMPLEMENTATIONS.items()}
    if len(set(results.values())) != 1:
        raise SystemExit(f"{path.name}: the implementations disagree: {results}")
    return results["new"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe_speed", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed batches per clip")
    parser.add_argument("--big-mb", type=int, default=100, help="size of the large files")
    parser.add_argument("--big-runs", type=int, default=3, help="timed runs per large file")
    args = parser.parse_args(argv)

    clips = {
        "3 s CBR 16 kHz mono 24 kbps": make_mp3(3.0),
        "3 s VBR 44.1 kHz stereo (sine)": make_mp3(3.0, sample_rate=44100, channels=2, vbr=True),
        "3 s VBR 16 kHz mono (speech-like)": speechlike_mp3(3.0),
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="probe-speed-") as tmp:
        print(f"python {platform.python_version()}, {args.repeats} x {args.calls} calls per clip")
        print(f"{'clip':40s} {'bytes':>10s} {'old µs/call':>12s} {'new µs/call':>12s} {'x':>6s}")
        for i, (label, clip) in enumerate(clips.items()):
            path = Path(tmp, f"clip{i}.mp3")
            path.write_bytes(clip)
            info = same_result(path)
            old, new = (t / args.calls * 1e6 for t in cpu_seconds(path, args.calls, args.repeats))
            print(f"{label:40s} {len(clip):10d} {old:12.1f} {new:12.1f} {old / new:6.1f}")
            rows.append(
                dict(
                    file=label,
                    bytes=len(clip),
                    duration_ms=info.duration_ms,
                    old_us=old,
                    new_us=new,
                )
            )

        big = f"file (median of {args.big_runs} runs)"
        print(f"\n{big:40s} {'bytes':>10s} {'old MB/s':>12s} {'new MB/s':>12s} {'x':>6s}")
        for i, (label, clip) in enumerate(clips.items()):
            path = Path(tmp, f"big{i}.mp3")
            path.write_bytes(clip * (args.big_mb * 1_000_000 // len(clip)))
            size = path.stat().st_size
            info = same_result(path)
            old, new = (size / 1e6 / t for t in cpu_seconds(path, 1, args.big_runs))
            name = f"{label.split(' ', 2)[2]} x{size // len(clip)}"
            print(f"{name:40s} {size:10d} {old:12.1f} {new:12.1f} {new / old:6.1f}")
            rows.append(
                dict(
                    file=name, bytes=size, duration_ms=info.duration_ms, old_mb_s=old, new_mb_s=new
                )
            )
            path.unlink()

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"probe_speed-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
