"""The progress display of a long operator command: one updating line on a terminal, a
log line every few seconds otherwise (``done/total pct | rate | ETA | counts | in flight``).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, TextIO


class Counts(Protocol):
    """What the display reads from the command's running counts."""

    @property
    def done(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    def breakdown(self) -> str:
        """The counts per outcome, short (``ingested 3 present 7``); empty when none."""
        ...


def duration(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _ClearLine(logging.Filter):
    """Erases the progress line before a log record is written to the same terminal."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True


class Progress:
    """A single updating line on a terminal, or a log line every few seconds.

    :attr:`name` is the command: the line starts with it on a terminal, and the log lines
    go to the ``fileserver.<name>`` logger.
    """

    name = "progress"

    def __init__(
        self,
        counts: Counts,
        total: int,
        *,
        mode: str,
        stream: TextIO,
        interval_s: float,
        status: Callable[[], str | None] = lambda: None,
    ) -> None:
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.mode = mode
        self.counts = counts
        self.total = total
        self.stream = stream
        self.interval_s = interval_s
        self.status = status
        self.log = logging.getLogger(f"fileserver.{self.name}")
        self.started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque(maxlen=50)
        self._drawn = False
        self._filter = _ClearLine(self)

    def line(self) -> str:
        """``done/total pct | rate | ETA | per-outcome counts | in flight [| paused: why]``."""
        now = time.monotonic()
        done = self.counts.done
        self._samples.append((now, done))
        t0, d0 = self._samples[0]
        if now - t0 < 1.0:
            t0, d0 = self.started, 0
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        left = max(0, self.total - done)
        eta = duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * done / self.total if self.total else 100.0
        paused = self.status()
        return (
            f"{done:,}/{self.total:,} {pct:.1f}% | {rate:,.0f}/s | ETA {eta} | "
            f"{self.counts.breakdown() or '-'} | in flight {self.counts.in_flight}"
            + (f" | paused: {paused}" if paused else "")
        )

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def draw(self) -> None:
        width = shutil.get_terminal_size((120, 20)).columns - 1
        self.stream.write("\r\x1b[K" + (f"{self.name} " + self.line())[:width])
        self.stream.flush()
        self._drawn = True

    async def run(self) -> None:
        """Until cancelled: redraw the line (terminal) or log the progress (otherwise)."""
        if self.mode == "none":
            return
        if self.mode == "bar":
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._filter)
        try:
            while True:
                if self.mode == "bar":
                    self.draw()
                    await asyncio.sleep(0.25)
                else:
                    await asyncio.sleep(self.interval_s)
                    self.log.info("progress %s", self.line())
        finally:
            self.clear()
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._filter)
