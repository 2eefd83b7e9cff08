"""Run ``fileserver worker`` under cProfile: ``python -m bench.profile_worker OUT``.

The profile is written to ``OUT`` when the worker exits (SIGTERM included). The
benchmark uses it with ``--profile``.
"""

from __future__ import annotations

import atexit
import cProfile
import sys


def main() -> None:
    out = sys.argv.pop(1)
    profiler = cProfile.Profile()

    def dump() -> None:
        profiler.disable()
        profiler.dump_stats(out)

    atexit.register(dump)
    from fileserver.cli import main as cli

    profiler.enable()
    sys.argv[1:] = ["worker"]
    raise SystemExit(cli())


if __name__ == "__main__":
    main()
