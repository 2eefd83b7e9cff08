"""Runs the speech analysis (:func:`fileserver.analysis.analyse`) for the pipeline.

Kept apart from :mod:`fileserver.analysis` (pure CPU work on bytes) because this is the
part with a lifecycle: where the decoding runs, how many at once, and how a burst that
cannot be analysed still becomes a row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fileserver.analysis import Analysis, AnalysisConfig, AnalysisError, analyse

log = logging.getLogger(__name__)


class Analyzer:
    """Runs :func:`analyse` for the pipeline: off the event loop, at most ``threads`` at
    once (each burst costs CPU, not I/O: more would only take the event loop's core),
    never failing the event.

    ``enabled=False``: nothing is decoded and every burst's analysis is ``None``.
    """

    def __init__(
        self,
        config: AnalysisConfig | None = None,
        *,
        enabled: bool = True,
        max_bytes: int = 4 * 1024 * 1024,
        threads: int = 2,
    ) -> None:
        self.config = config or AnalysisConfig()
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.threads = max(1, threads)
        self._slots: asyncio.Semaphore | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> Analyzer:
        """The analyzer the ``FILESERVER_ANALYSIS_*`` settings describe."""
        s = settings
        return cls(
            AnalysisConfig(
                vad_mode=s.analysis_vad_mode,
                min_dbfs=s.analysis_speech_min_dbfs,
                snr_db=s.analysis_speech_snr_db,
                min_speech_ms=s.analysis_min_speech_ms,
                clip_dbfs=s.analysis_clip_dbfs,
                max_seconds=float(s.max_duration_s),
            ),
            enabled=s.analysis_enabled,
            max_bytes=s.analysis_max_bytes,
            threads=s.analysis_threads,
        )

    async def run(
        self, content: bytes | Path, size: int, what: str, *, expected_ms: int | None = None
    ) -> Outcome:
        """Analyse one downloaded recording (``what`` names it in messages; ``expected_ms``
        is the probe's duration, see :func:`analyse`)."""
        if not self.enabled:
            return Outcome("disabled")
        if size > self.max_bytes:
            log.info(
                "analysis skipped for %s: %d bytes > FILESERVER_ANALYSIS_MAX_BYTES=%d",
                what,
                size,
                self.max_bytes,
            )
            return Outcome("skipped_size")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.threads)
        async with self._slots:
            try:
                analysis, cpu = await asyncio.to_thread(_timed, content, self.config, expected_ms)
            except AnalysisError as exc:
                log.warning("analysis failed for %s: %s (stored without it)", what, exc)
                return Outcome("failed")
        return Outcome("analysed", analysis, cpu)


@dataclass(frozen=True)
class Outcome:
    """How :meth:`Analyzer.run` ended: ``analysed`` (with the analysis and its CPU
    seconds), ``disabled``, ``skipped_size`` or ``failed``."""

    result: str
    analysis: Analysis | None = None
    cpu_s: float = 0.0


RESULTS = ("analysed", "disabled", "skipped_size", "failed")


def _timed(
    content: bytes | Path, config: AnalysisConfig, expected_ms: int | None = None
) -> tuple[Analysis, float]:
    """:func:`analyse` and the CPU time this thread spent on it."""
    started = time.thread_time()
    analysis = analyse(content, config, expected_ms=expected_ms)
    return analysis, time.thread_time() - started
