"""Metrics, the probes' server and the per-event log line (no network but loopback)."""

from __future__ import annotations

import gc
import gzip
import json
import logging
import platform
import socket
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import fileserver
from fileserver.deadletter import DeadLetterSink
from fileserver.errors import (
    ConfigError,
    DependencyUnavailable,
    PermanentError,
    Reason,
    SourceUnavailable,
)
from fileserver.events import TalkEvent, parse_event
from fileserver.fetch import MemoryBudget
from fileserver.logs import JsonFormatter
from fileserver.metrics import Metrics, dependency_label
from fileserver.pipeline import Outcome, Result
from fileserver.processor import Processor
from fileserver.record import SourceRecord
from fileserver.repository import NewFailure, Repository
from fileserver.retry import RetryPolicy
from fileserver.settings import Settings
from fileserver.web import NOT_RUNNING, Readiness, WebServer, bind_listener, faust_lag

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
URL = "https://gw.example:9666/room_1_user_14_1569569695.mp3"


def talk(url: str = URL) -> bytes:
    ptt = {"uid": "14", "grp_id": "7", "timestamp": "1569569697", "file_path": url, "md5": "md5"}
    return json.dumps({"msg_type": 1, "ip": "10.0.0.1", "ptt_msg": ptt}).encode()


def record(offset: int = 1, value: bytes | None = None) -> SourceRecord:
    return SourceRecord("events", 2, offset, talk() if value is None else value)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class Repo:
    def __init__(self) -> None:
        self.rows: set[tuple[str, int, int]] = set()

    async def has_failure(self, topic: str, partition: int, offset: int) -> bool:
        return (topic, partition, offset) in self.rows

    async def insert_failure(self, row: NewFailure) -> bool:
        self.rows.add((row.kafka_topic, row.kafka_partition, row.kafka_offset))
        return True


class Sink:
    def __init__(self, errors: int = 0) -> None:
        self.errors = errors

    async def publish(self, record: SourceRecord, reason: str, detail: str) -> None:
        if self.errors:
            self.errors -= 1
            raise DependencyUnavailable("dead-letter topic", "NotLeaderForPartitionError")


def processor(
    steps: list[BaseException | Result], metrics: Metrics, sink: Sink | None = None
) -> Processor:
    calls = iter(range(10_000))

    async def ingest(rec: SourceRecord) -> Result:
        step = steps[min(next(calls), len(steps) - 1)]
        if isinstance(step, BaseException):
            raise step
        return step

    async def no_sleep(delay: float) -> None:
        return None

    return Processor(
        ingest,
        cast(Repository, Repo()),
        cast(DeadLetterSink, sink or Sink()),
        source_retry_s=60.0,
        retry=RetryPolicy(initial_s=0.01, max_s=0.02),
        sleep=no_sleep,
        metrics=metrics,
    )


def ingested(rec: SourceRecord, outcome: Outcome = Outcome.INGESTED) -> Result:
    event = parse_event(rec.value)
    assert isinstance(event, TalkEvent)
    return Result(
        outcome,
        rec,
        event=event,
        md5="9e107d9d372bb6826bd81d3542a419d6",
        s3_key="7/14/2019/09/27/1569569697-9e107d9d372bb6826bd81d3542a419d6.mp3",
    )


# --- declarations --------------------------------------------------------------------------


def exported_names(metrics: Metrics) -> dict[str, str]:
    """Sample names as scraped (counters end in _total) and their help."""
    out = {}
    for family in metrics.registry.collect():
        if family.name.startswith("fileserver_"):
            name = family.name + ("_total" if family.type == "counter" else "")
            out[name] = family.documentation
    return out


def test_every_metric_is_declared_once_with_a_one_line_meaning() -> None:
    names = exported_names(Metrics(process=False))
    assert len(names) == 20
    for name, meaning in names.items():
        assert meaning and "\n" not in meaning and meaning.endswith("."), name
        assert len(meaning) <= 100, name


def _undocumented() -> list[str]:
    section = OPERATIONS.read_text().split("\n## Metrics and probes\n", 1)[1].split("\n## ", 1)[0]
    return [n for n in exported_names(Metrics(process=False)) if f"`{n}`" not in section]


def test_the_operations_guide_lists_every_metric() -> None:
    assert not _undocumented()


def test_build_info_names_the_versions() -> None:
    m = Metrics(process=False)
    (family,) = [f for f in m.registry.collect() if f.name == "fileserver_build_info"]
    (s,) = family.samples
    assert s.value == 1
    assert s.labels == {
        "version": fileserver.__version__,
        "python": platform.python_version(),
        "faust": version("faust-streaming"),
        "aiokafka": version("aiokafka"),
    }


def test_labels_are_present_at_zero_before_anything_happens() -> None:
    text = Metrics(process=False).render()[0].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    reasons = {s.labels["reason"] for s in families["fileserver_dead_letters"].samples}
    assert reasons == {r.value for r in Reason}
    assert "_created" not in text


# --- outcomes, retries, stages ---------------------------------------------------------------


async def test_outcomes_are_counted_and_timed_by_kind() -> None:
    m = Metrics(process=False)
    rec = record(1)
    await processor([ingested(rec)], m).process(rec)
    await processor([ingested(rec, Outcome.DUPLICATE)], m).process(record(2))
    skip = record(3, b'{"msg_type": 3, "quality_msg": {}}')
    await processor([Result(Outcome.SKIPPED, skip, skipped_type=3)], m).process(skip)
    await processor([PermanentError(Reason.TOO_LARGE, "big")], m).process(record(4))

    for outcome in ("ingested", "duplicate", "skipped", "dead_lettered"):
        assert sample(m, "fileserver_events_total", outcome=outcome) == 1, outcome
        assert sample(m, "fileserver_event_duration_seconds_count", outcome=outcome) == 1
    assert sample(m, "fileserver_skipped_events_total", msg_type="3") == 1
    assert sample(m, "fileserver_skipped_events_total", msg_type="2") == 0
    assert sample(m, "fileserver_dead_letters_total", reason="too_large") == 1
    assert sample(m, "fileserver_dead_letters_total", reason="invalid_audio") == 0


def test_an_outcome_is_recorded_from_plain_values() -> None:
    m = Metrics(process=False)
    m.outcome("dead_lettered", reason="md5_mismatch", elapsed_s=0.25)
    m.outcome("skipped", skipped_type=2)
    m.outcome("already_failed", elapsed_s=-1.0)  # a clock step back: observed as 0
    assert sample(m, "fileserver_events_total", outcome="dead_lettered") == 1
    assert sample(m, "fileserver_dead_letters_total", reason="md5_mismatch") == 1
    assert sample(m, "fileserver_event_duration_seconds_sum", outcome="dead_lettered") == 0.25
    assert sample(m, "fileserver_skipped_events_total", msg_type="2") == 1
    assert sample(m, "fileserver_event_duration_seconds_count", outcome="skipped") == 0
    assert sample(m, "fileserver_event_duration_seconds_sum", outcome="already_failed") == 0


async def test_retries_are_counted_by_dependency() -> None:
    m = Metrics(process=False)
    rec = record()
    steps: list[BaseException | Result] = [
        SourceUnavailable("HTTP 503"),
        SourceUnavailable("HTTP 503"),
        DependencyUnavailable("s3", "SlowDown"),
        DependencyUnavailable("postgres", "connection refused"),
        RuntimeError("a bug"),
        ingested(rec),
    ]
    p = processor(steps, m)
    assert (await p.process(rec)).outcome is Outcome.INGESTED
    await processor([PermanentError(Reason.INVALID_AUDIO, "html")], m, Sink(errors=2)).process(rec)

    assert sample(m, "fileserver_retries_total", dependency="source") == 2
    assert sample(m, "fileserver_retries_total", dependency="s3") == 1
    assert sample(m, "fileserver_retries_total", dependency="postgres") == 1
    assert sample(m, "fileserver_retries_total", dependency="unexpected") == 1
    assert sample(m, "fileserver_retries_total", dependency="dead_letter_topic") == 2


def test_dependency_labels_are_bounded() -> None:
    assert dependency_label("dead-letter topic") == "dead_letter_topic"
    assert dependency_label("S3") == "s3"
    assert dependency_label("something new") == "unexpected"


def test_a_stage_is_observed_only_when_it_succeeds() -> None:
    m = Metrics(process=False)
    with m.stage("probe"):
        pass
    with pytest.raises(ValueError), m.stage("probe"):
        raise ValueError("not audio")
    m.fetched(1234, 0.5)
    m.uploaded(1000)
    assert sample(m, "fileserver_stage_duration_seconds_count", stage="probe") == 1
    assert sample(m, "fileserver_stage_duration_seconds_count", stage="fetch") == 1
    assert sample(m, "fileserver_stage_duration_seconds_sum", stage="fetch") == 0.5
    assert sample(m, "fileserver_downloaded_bytes_total") == 1234
    assert sample(m, "fileserver_uploaded_bytes_total") == 1000


def test_pause_gauge_and_pause_count() -> None:
    m = Metrics(process=False)
    for paused in (True, True, False, False, True, False):
        m.set_paused(paused)
        assert sample(m, "fileserver_intake_paused") == (1.0 if paused else 0.0)
    assert sample(m, "fileserver_intake_pauses_total") == 2


def test_live_gauges_are_read_when_scraped() -> None:
    m = Metrics(process=False)
    state = SimpleNamespace(in_flight=3, pending=7, lag=[("events", 0, 5), ("events", 1, 0)])
    m.watch_window(lambda: state.in_flight, lambda: state.pending)
    m.watch_lag(lambda: state.lag)
    assert sample(m, "fileserver_in_flight_events") == 3
    state.in_flight = 1
    assert sample(m, "fileserver_in_flight_events") == 1
    assert sample(m, "fileserver_pending_events") == 7
    assert sample(m, "fileserver_consumer_lag", topic="events", partition="0") == 5
    assert sample(m, "fileserver_consumer_lag", topic="events", partition="1") == 0

    def broken() -> list[tuple[str, int, int]]:
        raise RuntimeError("rebalancing")

    m.watch_lag(broken)
    assert b"fileserver_events_total" in m.render()[0]  # the scrape still works
    m.unwatch_window()
    assert sample(m, "fileserver_in_flight_events") == 0


def test_download_memory_is_read_from_live_budgets_when_scraped() -> None:
    m = Metrics(process=False)
    assert sample(m, "fileserver_download_memory_bytes") == 0
    one, two = MemoryBudget(100), MemoryBudget(100)
    m.watch_memory(one)
    m.watch_memory(two)
    assert one.reserve(60) and two.reserve(30) and not one.reserve(41)
    assert sample(m, "fileserver_download_memory_bytes") == 90
    one.release(60)
    assert sample(m, "fileserver_download_memory_bytes") == 30
    del two  # a fetcher gone: its budget is no longer watched
    gc.collect()
    assert sample(m, "fileserver_download_memory_bytes") == 0
    assert one.reserve(5) and sample(m, "fileserver_download_memory_bytes") == 5
    assert sample(m, "fileserver_download_spills_total") == 0
    m.budget_spilled()
    assert sample(m, "fileserver_download_spills_total") == 1


def test_faust_lag_is_end_minus_committed_per_assigned_partition() -> None:
    from faust.types import TP

    p0, p1, p2, p3 = (TP("events", i) for i in range(4))
    ends = {0: 120, 1: 40, 2: None}

    def highwater(t: Any) -> int | None:
        if t.partition == 3:
            raise AssertionError("Partition is not assigned")
        return ends[t.partition]

    consumer = SimpleNamespace(
        assignment=lambda: [p0, p1, p2, p3],
        highwater=highwater,
        _committed_offset={p0: 100},
    )
    # p1 has no commit yet: its whole log is lag; p2 has no highwater yet; p3 was revoked.
    assert sorted(faust_lag(consumer)()) == [("events", 0, 20), ("events", 1, 40)]


# --- the per-event log line ----------------------------------------------------------------


async def test_one_structured_log_line_per_outcome(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics(process=False)
    secret_url = "https://user:hunter2@gw.example:9666/room_1_user_14_1569569695.mp3"
    rec = record(5, talk(secret_url))
    caplog.set_level(logging.DEBUG, logger="fileserver.events")
    await processor([ingested(rec)], m).process(rec)
    bad = record(6, talk(secret_url))
    await processor([PermanentError(Reason.SOURCE_NOT_FOUND, "HTTP 404")], m).process(bad)
    skip = record(7, b'{"msg_type": 2}')
    await processor([Result(Outcome.SKIPPED, skip, skipped_type=2)], m).process(skip)

    lines = [r for r in caplog.records if hasattr(r, "fields")]
    assert [r.fields["outcome"] for r in lines] == ["ingested", "dead_lettered", "skipped"]  # type: ignore[attr-defined]
    docs = [json.loads(JsonFormatter().format(r)) for r in lines]
    ok, dead, skipped = docs
    assert (ok["topic"], ok["partition"], ok["offset"]) == ("events", 2, 5)
    assert (ok["uid"], ok["grp_id"], ok["md5"]) == (14, 7, "9e107d9d372bb6826bd81d3542a419d6")
    assert ok["s3_key"].endswith(".mp3") and ok["elapsed_ms"] >= 0 and ok["level"] == "info"
    assert (dead["reason"], dead["detail"], dead["uid"]) == ("source_not_found", "HTTP 404", 14)
    assert dead["level"] == "warning"
    assert skipped["msg_type"] == 2 and skipped["level"] == "debug"
    for doc in docs:
        assert "hunter2" not in json.dumps(doc)
    assert "user:***@gw.example" in ok["source_url"]
    # The readable form (a terminal) carries the same facts in its message.
    text = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(lines[1])
    assert "reason=source_not_found" in text and "uid=14" in text and "events/2/6" in text


# --- readiness -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_readiness_caches_checks_and_names_what_fails() -> None:
    calls = {"kafka": 0, "s3": 0, "postgres": 0}
    failing: set[str] = set()

    def check(name: str) -> Any:
        async def run() -> None:
            calls[name] += 1
            if name in failing:
                raise DependencyUnavailable(name, "connection refused")

        return run

    health = SimpleNamespace(ok=True, reason=None)
    clock = Clock()
    ready = Readiness({n: check(n) for n in calls}, cast(Any, health), interval_s=5.0, clock=clock)
    status = await ready.status()
    assert status.ready and status.reason is None
    assert status.checks == {"kafka": "ok", "s3": "ok", "postgres": "ok", "intake": "ok"}

    failing.add("postgres")
    assert (await ready.status()).ready  # cached
    assert calls == {"kafka": 1, "s3": 1, "postgres": 1}
    clock.now += 5.0
    status = await ready.status()
    assert not status.ready and status.reason == "postgres: connection refused"
    assert calls == {"kafka": 2, "s3": 2, "postgres": 2}

    failing.clear()
    health.ok, health.reason = False, "s3: SlowDown"
    status = await ready.status()  # the pause itself triggers a fresh check
    assert calls["s3"] == 3
    assert not status.ready and status.reason == "intake: paused: s3: SlowDown"


async def test_a_hanging_check_is_not_ready_in_bounded_time() -> None:
    import asyncio

    async def hang() -> None:
        await asyncio.Event().wait()

    health = SimpleNamespace(ok=True, reason=None)
    status = await Readiness({"kafka": hang}, cast(Any, health), timeout_s=0.05).status()
    assert not status.ready and status.reason == "kafka: no answer in time"


# --- the HTTP server -------------------------------------------------------------------------


async def test_server_answers_metrics_healthz_and_readyz() -> None:
    m = Metrics()
    m.events.labels("ingested").inc(3)
    server = WebServer(m, bind_listener("127.0.0.1", 0))
    await server.start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            async with http.get("/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=")
                body = await resp.text()
            assert 'fileserver_events_total{outcome="ingested"} 3.0' in body
            assert "process_resident_memory_bytes" in body
            assert "fileserver_build_info{" in body
            # OpenMetrics when the scraper asks for it (Prometheus does), ending in # EOF
            openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with http.get("/metrics", headers=openmetrics) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
                body = await resp.text()
            assert body.endswith("# EOF\n")
            assert 'fileserver_events_total{outcome="ingested"} 3.0' in body
            # gzip when accepted: read the raw bytes, aiohttp's client would inflate them
            async with http.get(
                "/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False
            ) as resp:
                assert resp.headers["Content-Encoding"] == "gzip"
                raw = await resp.read()
            assert b"fileserver_build_info{" in gzip.decompress(raw)
            async with http.get("/metrics", headers={"Accept-Encoding": "identity"}) as resp:
                assert "Content-Encoding" not in resp.headers
            async with http.get("/healthz") as resp:
                assert (resp.status, await resp.json()) == (200, {"status": "alive"})
            async with http.get("/readyz") as resp:
                assert (resp.status, await resp.json()) == (503, NOT_RUNNING.as_json())

            async def fine() -> None:
                return None

            health = SimpleNamespace(ok=True, reason=None)
            server.readiness = Readiness({"postgres": fine}, cast(Any, health))
            async with http.get("/readyz") as resp:
                doc = await resp.json()
                assert resp.status == 200 and doc["ready"] is True
    finally:
        await server.stop()


def test_a_busy_metrics_port_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"FILESERVER_METRICS_PORT={port}"):
            bind_listener("127.0.0.1", port)


def test_metrics_settings() -> None:
    s = Settings.from_env({})
    assert (s.metrics_host, s.metrics_port) == ("127.0.0.1", 9108)
    s = Settings.from_env({"FILESERVER_METRICS_HOST": "0.0.0.0", "FILESERVER_METRICS_PORT": "0"})
    assert (s.metrics_host, s.metrics_port) == ("0.0.0.0", 0)
    with pytest.raises(ConfigError, match="FILESERVER_METRICS_PORT"):
        Settings.from_env({"FILESERVER_METRICS_PORT": "70000"})
