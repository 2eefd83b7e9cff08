"""Prometheus metrics of the worker: every name is declared once, here, with its meaning.

:class:`Metrics` owns a dedicated :class:`~prometheus_client.CollectorRegistry` (nothing
is registered in prometheus_client's global registry). The pipeline, the processor and
the worker record into the process-wide instance returned by :func:`get_metrics`;
tests build their own. :mod:`fileserver.web` serves the registry on ``/metrics``
through prometheus_client's aiohttp handler (Prometheus text or OpenMetrics, as the
scraper asks; gzip when it accepts it). Gauges that describe live state (in-flight
events, consumer lag, download memory) are computed when scraped, from callbacks the
worker installs.
"""

from __future__ import annotations

import platform
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from fileserver import __version__
from fileserver.errors import Reason
from fileserver.events import SKIPPED_TYPES

PREFIX = "fileserver"
STAGES = ("fetch", "probe", "upload", "record")
OUTCOMES = ("ingested", "duplicate", "skipped", "dead_lettered", "already_failed")
# Retry labels: the event's own source, the shared dependencies, bugs, and breaker holds.
DEPENDENCIES = (
    "source",
    "s3",
    "postgres",
    "dead_letter_topic",
    "kafka",
    "unexpected",
    "breaker",
)
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
EVENT_BUCKETS = (*STAGE_BUCKETS, 300, 600, 1800)
DB_STATEMENTS = ("insert", "lookup")
DB_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ANALYSIS_RESULTS = ("analysed", "disabled", "skipped_size", "failed")
#: Talk groups given their own ``grp_id`` label on ``fileserver_empty_bursts_total``;
#: later ones share ``grp_id="other"``. Talk groups are provisioned entities (tens to
#: hundreds per deployment, not per-call ids), and a series exists only for a group that
#: had an empty burst, so this bound is only a guard against a flood of forged ids: at
#: most 1001 series (~100 KB per scrape) whatever the events say.
MAX_GROUP_LABELS = 1000
OTHER_GROUPS = "other"

LAG_NAME = f"{PREFIX}_consumer_lag"
LAG_HELP = "Records of an assigned partition after the group's committed offset (end - committed)."

BUILD_INFO_LABELS = ("version", "python", "faust", "aiokafka")

# (topic, partition, lag) for every assigned partition, computed when scraped.
LagSource = Callable[[], Iterable[tuple[str, int, int]]]


class HeldBytes(Protocol):
    """Bytes of recordings something holds in memory now (a fetcher's memory budget)."""

    @property
    def held(self) -> int: ...


def _installed(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def build_labels() -> dict[str, str]:
    """The ``fileserver_build_info`` labels of this process."""
    return {
        "version": __version__,
        "python": platform.python_version(),
        "faust": _installed("faust-streaming"),
        "aiokafka": _installed("aiokafka"),
    }


def dependency_label(dependency: str) -> str:
    """The ``dependency`` label of a retry: ``dead-letter topic`` -> ``dead_letter_topic``."""
    label = dependency.strip().lower().replace("-", "_").replace(" ", "_")
    return label if label in DEPENDENCIES else "unexpected"


class _LagCollector:
    """Yields ``fileserver_consumer_lag`` from the installed source at scrape time."""

    def __init__(self) -> None:
        self.source: LagSource | None = None

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(LAG_NAME, LAG_HELP, labels=("topic", "partition"))]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(LAG_NAME, LAG_HELP, labels=("topic", "partition"))
        source = self.source
        if source is not None:
            try:
                rows = list(source())
            except Exception:  # a consumer mid-rebalance: no samples rather than no scrape
                rows = []
            for topic, partition, lag in rows:
                family.add_metric((topic, str(partition)), float(lag))
        yield family


@dataclass
class Stopwatch:
    """Seconds since it was started (monotonic clock)."""

    started: float

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class StageTimer:
    """The ``with`` block of :meth:`Metrics.stage`: a plain class, not a generator made
    into a context manager (three an event)."""

    __slots__ = ("_metrics", "_stage", "_started")

    def __init__(self, metrics: Metrics, stage: str) -> None:
        self._metrics = metrics
        self._stage = stage
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.monotonic()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:  # only steps that succeed are observed
            self._metrics.observe_stage(self._stage, time.monotonic() - self._started)


class Metrics:
    """Every metric fileserver exports, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            f"{PREFIX}_events_total",
            "Events whose outcome is durable, by outcome.",
            ("outcome",),
            registry=r,
        )
        self.skipped = Counter(
            f"{PREFIX}_skipped_events_total",
            "Events of another kind counted and skipped, by msg_type (2 signal, 3 quality).",
            ("msg_type",),
            registry=r,
        )
        self.dead_letters = Counter(
            f"{PREFIX}_dead_letters_total",
            "Events dead-lettered (topic record + ingest_failures row), by reason.",
            ("reason",),
            registry=r,
        )
        self.downloaded_bytes = Counter(
            f"{PREFIX}_downloaded_bytes_total",
            "Bytes of recordings downloaded completely from their sources.",
            registry=r,
        )
        self.uploaded_bytes = Counter(
            f"{PREFIX}_uploaded_bytes_total",
            "Bytes of recordings stored in the bucket.",
            registry=r,
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "Time of one successful pipeline step: fetch, probe, upload or record.",
            ("stage",),
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.event_seconds = Histogram(
            f"{PREFIX}_event_duration_seconds",
            "End-to-end time of one event, retries included, until its outcome is durable.",
            ("outcome",),
            buckets=EVENT_BUCKETS,
            registry=r,
        )
        self.db_batch_rows = Histogram(
            f"{PREFIX}_db_batch_rows",
            "Rows per batched database statement: insert (new rows) or lookup (already ingested?).",
            ("statement",),
            buckets=DB_BATCH_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}_retries_total",
            "Retries scheduled after a transient failure, by the dependency that failed.",
            ("dependency",),
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight_events",
            "Events started and not finished (running, or waiting for a slot or for intake).",
            registry=r,
        )
        self.pending = Gauge(
            f"{PREFIX}_pending_events",
            "Events read but not yet committable (at most FILESERVER_MAX_PENDING).",
            registry=r,
        )
        self.paused = Gauge(
            f"{PREFIX}_intake_paused",
            "1 while intake is paused because S3, Postgres or the dead-letter topic fails.",
            registry=r,
        )
        self.pauses = Counter(
            f"{PREFIX}_intake_pauses_total",
            "Times intake was paused for a systemic outage.",
            registry=r,
        )
        self.download_memory = Gauge(
            f"{PREFIX}_download_memory_bytes",
            "Bytes of recordings held in memory by downloads in flight.",
            registry=r,
        )
        self.download_spills = Counter(
            f"{PREFIX}_download_spills_total",
            "Downloads spooled to a file because the download memory budget was spent.",
            registry=r,
        )
        self.empty_bursts = Counter(
            f"{PREFIX}_empty_bursts_total",
            "Bursts with no speech (analysis: empty), by talk group (grp_id; 'other' past 1000).",
            ("grp_id",),
            registry=r,
        )
        self.analyses = Counter(
            f"{PREFIX}_analyses_total",
            "Speech analyses of bursts, by result: analysed, disabled, skipped_size or failed.",
            ("result",),
            registry=r,
        )
        self.analysis_cpu = Counter(
            f"{PREFIX}_analysis_cpu_seconds_total",
            "CPU seconds spent analysing bursts (per burst: divide by analysed analyses).",
            registry=r,
        )
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Always 1; the labels name the fileserver, Python, faust and aiokafka versions.",
            BUILD_INFO_LABELS,
            registry=r,
        )
        self.build_info.labels(**build_labels()).set(1)
        self._empty_groups: set[str] = set()
        self._is_paused = False
        # Read when scraped: nothing is recorded per chunk; a fetcher's budget leaves with it.
        self._budgets: weakref.WeakSet[HeldBytes] = weakref.WeakSet()
        self.download_memory.set_function(self._memory_held)
        self._lag = _LagCollector()
        r.register(self._lag)
        if process:
            ProcessCollector(registry=r)
        # The children of the labels recorded per event, looked up once: labels() takes
        # a lock and builds a key on every call (~2 µs, seven calls an event).
        self._events = {outcome: self.events.labels(outcome) for outcome in OUTCOMES}
        self._event_seconds = {o: self.event_seconds.labels(o) for o in OUTCOMES}
        for msg_type in SKIPPED_TYPES:
            self.skipped.labels(str(msg_type))
        self._db_batches = {name: self.db_batch_rows.labels(name) for name in DB_STATEMENTS}
        for reason in Reason:
            self.dead_letters.labels(reason.value)
        self._stages = {stage: self.stage_seconds.labels(stage) for stage in STAGES}
        for dependency in DEPENDENCIES:
            self.retries.labels(dependency)
        self._analyses = {result: self.analyses.labels(result) for result in ANALYSIS_RESULTS}

    # -- recording -------------------------------------------------------------------

    def outcome(
        self,
        outcome: str,
        *,
        reason: str | None = None,
        skipped_type: int | None = None,
        elapsed_s: float | None = None,
    ) -> None:
        """Count one durable ``outcome`` (one of :data:`OUTCOMES`): its dead-letter
        ``reason`` or ``skipped_type`` when it has one, and its end-to-end time when known."""
        (self._events.get(outcome) or self.events.labels(outcome)).inc()
        if skipped_type is not None:
            self.skipped.labels(str(skipped_type)).inc()
        if reason is not None:
            self.dead_letters.labels(reason).inc()
        if elapsed_s is not None:
            seconds = self._event_seconds.get(outcome) or self.event_seconds.labels(outcome)
            seconds.observe(max(0.0, elapsed_s))

    @staticmethod
    def stopwatch() -> Stopwatch:
        """Start timing something that is not a ``with`` block (the download)."""
        return Stopwatch(time.monotonic())

    def db_batch(self, statement: str, rows: int) -> None:
        """One batched statement (``insert`` or ``lookup``) of ``rows`` rows was sent."""
        self._db_batches[statement].observe(rows)

    def observe_stage(self, stage: str, seconds: float) -> None:
        (self._stages.get(stage) or self.stage_seconds.labels(stage)).observe(max(0.0, seconds))

    def fetched(self, size: int, seconds: float) -> None:
        """One complete download of ``size`` bytes that took ``seconds``."""
        self.downloaded_bytes.inc(size)
        self.observe_stage("fetch", seconds)

    def uploaded(self, size: int) -> None:
        self.uploaded_bytes.inc(size)

    def stage(self, stage: str) -> StageTimer:
        """Time a pipeline step (``with``); only steps that succeed are observed."""
        return StageTimer(self, stage)

    def analysed(self, result: str, *, cpu_s: float, grp_id: int, empty: bool) -> None:
        """One burst's analysis ended with ``result`` (:data:`ANALYSIS_RESULTS`) after
        ``cpu_s`` CPU seconds; ``empty``: it found no speech in talk group ``grp_id``."""
        (self._analyses.get(result) or self.analyses.labels(result)).inc()
        if cpu_s > 0:
            self.analysis_cpu.inc(cpu_s)
        if empty:
            group = str(grp_id)
            if group not in self._empty_groups:
                if len(self._empty_groups) >= MAX_GROUP_LABELS:
                    group = OTHER_GROUPS
                else:
                    self._empty_groups.add(group)
            self.empty_bursts.labels(group).inc()

    def retried(self, dependency: str) -> None:
        """Count one scheduled retry (``dependency`` as in ``DependencyUnavailable``)."""
        self.retries.labels(dependency_label(dependency)).inc()

    def budget_spilled(self) -> None:
        """One download went to a file because the memory budget was spent (not because
        it outgrew the in-memory limit)."""
        self.download_spills.inc()

    def set_paused(self, paused: bool) -> None:
        """Intake paused (``True``) or resumed; counts the transitions to paused."""
        if paused and not self._is_paused:
            self.pauses.inc()
        self._is_paused = paused
        self.paused.set(1.0 if paused else 0.0)

    # -- live state, computed when scraped ----------------------------------------------

    def watch_window(self, in_flight: Callable[[], int], pending: Callable[[], int]) -> None:
        """Read the in-flight and pending gauges from the running intake window."""
        self.in_flight.set_function(lambda: float(in_flight()))
        self.pending.set_function(lambda: float(pending()))

    def unwatch_window(self) -> None:
        self.in_flight.set_function(lambda: 0.0)
        self.pending.set_function(lambda: 0.0)

    def watch_memory(self, budget: HeldBytes) -> None:
        """Add ``budget``'s bytes held to ``fileserver_download_memory_bytes`` on each
        scrape, for as long as the budget lives (it is held weakly)."""
        self._budgets.add(budget)

    def _memory_held(self) -> float:
        return float(sum(budget.held for budget in self._budgets))

    def watch_lag(self, source: LagSource | None) -> None:
        """Compute ``fileserver_consumer_lag`` from ``source`` on each scrape (``None``: none)."""
        self._lag.source = source

    # -- exposition --------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def help_texts(self) -> dict[str, str]:
        """Every metric family this registry exports and its one-line meaning."""
        return {m.name: m.documentation for m in self.registry.collect()}


@lru_cache(maxsize=1)
def get_metrics() -> Metrics:
    """The process-wide metrics (created on first use)."""
    return Metrics()
