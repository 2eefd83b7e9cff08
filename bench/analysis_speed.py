"""Cost of the speech analysis per event: ``python -m bench.analysis_speed``.

Builds the labelled corpus of tests/integration/test_analysis_corpus.py (espeak-ng, sox,
ffmpeg; 16 kHz mono 24 kbit/s MP3, 0.5-5 s) and times :func:`fileserver.analysis.analyse`
on each clip: process CPU time (``time.process_time``: user + system, so other load on
the machine matters less), the median of ``--repeats`` runs of each clip. Prints CPU ms
per clip, per second of audio, and the share of one core it takes at a given event rate.
Also times the probe (:func:`fileserver.probe.probe_bytes`), the one CPU step every event
already had, for scale.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fileserver.analysis import analyse
from fileserver.probe import probe_bytes


def cpu_ms(fn: object, data: bytes, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        started = time.process_time()
        fn(data)  # type: ignore[operator]
        runs.append((time.process_time() - started) * 1000)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--events-per-s", type=float, default=100.0)
    args = parser.parse_args(argv)
    from tests.integration.test_analysis_corpus import build_corpus, missing_tools

    if missing_tools():
        print(f"needs {', '.join(missing_tools())} (apt-get install -y espeak-ng sox ffmpeg)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        clips = build_corpus(Path(tmp))
        rows = []
        for clip in clips:
            data = clip.path.read_bytes()
            audio_s = analyse(data).decoded_ms / 1000
            rows.append(
                (
                    clip.name,
                    audio_s,
                    cpu_ms(analyse, data, args.repeats),
                    cpu_ms(lambda d: probe_bytes(d, "bench"), data, args.repeats),
                )
            )
    print(f"{'clip':18} {'audio s':>7} {'analysis ms':>11} {'ms/audio s':>10} {'probe ms':>8}")
    for name, audio_s, ms, probe_ms in rows:
        print(f"{name:18} {audio_s:7.2f} {ms:11.2f} {ms / audio_s:10.2f} {probe_ms:8.3f}")
    total_audio = sum(r[1] for r in rows)
    total_ms = sum(r[2] for r in rows)
    mean_ms = total_ms / len(rows)
    per_audio_s = total_ms / total_audio
    probe_ms = statistics.mean(r[3] for r in rows)
    print(
        f"mean {mean_ms:.2f} ms CPU per clip (mean {total_audio / len(rows):.2f} s of audio), "
        f"{per_audio_s:.2f} ms per second of audio; probe {probe_ms:.3f} ms"
    )
    print(
        f"at {args.events_per_s:g} events/s of such clips: "
        f"{mean_ms * args.events_per_s / 10:.1f} % of one core"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
