"""The analysis thread beside a busy event loop: ``python -m bench.analysis_gil``.

Decodes a 3 s burst (:func:`fileserver.analysis._blocks`, the worker's decoder) in a loop
in one thread for ``--seconds``, first while the main thread sleeps, then while it runs
Python code (as the event loop does at full load), and prints decodes per second for
each; then the same for the whole analysis (:func:`fileserver.analysis.analyse`). The
gap is the GIL: each call into miniaudio releases it and must wait to take it back (the
busy main thread keeps it for up to ``sys.getswitchinterval()``, 5 ms). The decoder
used to stream through Python read callbacks, each waiting for it (~90 per 9 KB burst);
it now makes 5 (init, 3 reads, uninit), and the VAD's calls do not release it.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable


def rate(decode: Callable[[], None], seconds: float, busy: bool) -> float:
    """Decodes per second in a thread while the main thread sleeps or computes."""
    stop = threading.Event()
    count = 0

    def loop() -> None:
        nonlocal count
        while not stop.is_set():
            decode()
            count += 1

    thread = threading.Thread(target=loop)
    started = time.monotonic()
    thread.start()
    if busy:
        while time.monotonic() - started < seconds:
            sum(range(1000))
    else:
        time.sleep(seconds)
    stop.set()
    thread.join()
    return count / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    from fileserver.analysis import SAMPLE_RATE, _blocks, analyse
    from fileserver.devstack.samples import make_mp3

    data = make_mp3(3.0, freq_hz=300)

    def decode() -> None:
        for _ in _blocks(data, 600 * SAMPLE_RATE):
            pass

    def analysis() -> None:
        analyse(data)

    for name, work in (("decodes", decode), ("analyses", analysis)):
        idle = rate(work, args.seconds, busy=False)
        busy = rate(work, args.seconds, busy=True)
        print(f"{name}/s in a thread: main thread idle {idle:,.0f}, main thread busy {busy:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
