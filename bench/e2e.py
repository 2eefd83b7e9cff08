"""End-to-end benchmark of the worker against the real stack (``python -m bench``).

Starts Apache Kafka (KRaft), SeaweedFS and Postgres on free loopback ports, an aiohttp
source server in its own process (:mod:`bench.sources`) serving realistic clips (3 s,
16 kHz mono, 24 kbps CBR, ~9 KB), then runs the selected cases, each ``--runs`` times
with fresh topics, group, bucket and database:

* ``throughput``: one ``fileserver worker`` process (``--workers N``: N in one group, on
  ``--partitions`` partitions, by default 2 per worker) (the settings of ``--preset``, by
  default the code defaults, plus ``--env``). After a warm-up event, N seed-format
  events are published as fast as possible; events/s is N over the time from the first
  publish to the last row's ``ingested_at``. Also: worker CPU per
  event (utime+stime from /proc), peak RSS (VmHWM), p50/p99 publish→row latency. Then a
  paced run at half the median maximum rate gives the latency at that load.
* ``naive``: the sequential baseline with the same libraries, in this process: consume
  one → httpx GET → md5 → mutagen → boto3 put → ORM insert + commit → commit offset.
* ``scale``: 1, 2 and 4 worker processes in one group on a 4-partition topic: events/s
  and worker CPU per event at the maximum, then p99 publish→row (and CPU per event)
  at half the 1-worker median maximum for each count.
* ``clips``: 64 one-minute clips at once (peak RSS); ``large``: one 1 GiB recording.
* ``peers``: fileserver beside a Benthos v4.27.0 pipeline doing the same job and the
  naive loop, each on its own 3-partition topic (:mod:`bench.peers`).

Prints a table and writes a JSON file under ``bench/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BASE_TS = 1569569600
CASES = ("throughput", "naive", "scale", "clips", "large", "peers")
SCALE_WORKERS = (1, 2, 4)
# Worker settings presets (``--preset``): the code defaults (http11 downloads and S3
# PUTs); ``deployment``, what the image set before the defaults changed (aiohttp
# downloads, http11 S3 PUTs; most figures in bench/README.md were measured on it); and
# the deployment before that, aiohttp for both (``aiohttp``).
PRESETS: dict[str, dict[str, str]] = {
    "defaults": {},
    "deployment": {"FILESERVER_HTTP_TRANSPORT": "aiohttp", "FILESERVER_S3_TRANSPORT": "http11"},
    "aiohttp": {"FILESERVER_HTTP_TRANSPORT": "aiohttp", "FILESERVER_S3_TRANSPORT": "aiohttp"},
}
N_CLIPS = 64


@dataclass
class Run:
    """One measured run of one case."""

    case: str
    events: int
    seconds: float
    workers: int = 1
    cpu_ms_per_event: float | None = None
    peak_rss_mb: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    offered_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Bench:
    """The servers of one benchmark invocation."""

    kafka: str
    kafka_pid: int | None
    s3: Any
    pg: Any
    source_base: str
    workdir: Path
    worker_env: dict[str, str]
    profile: Path | None = None
    metrics_ports: list[int] = field(default_factory=list)
    source_pid: int | None = None

    def server_pids(self) -> dict[str, int]:
        """Main process of each server (Postgres backends are not included)."""
        pids = {"kafka": self.kafka_pid, "seaweedfs": self.s3.pid, "source": self.source_pid}
        return {k: v for k, v in pids.items() if v}

    def stack(self, partitions: int = 1, **extra: str) -> Any:
        """A fresh topic / group / bucket / database, prepared."""
        from fileserver.devstack.stack import StackConfig, prepare

        name = uuid.uuid4().hex[:8]
        config = StackConfig(
            kafka_bootstrap=self.kafka,
            s3_endpoint_url=self.s3.endpoint_url,
            s3_access_key=self.s3.access_key,
            s3_secret_key=self.s3.secret_key,
            s3_region=self.s3.region,
            database_url=self.pg.create_database(f"bench_{name}"),
            topic=f"bench-{name}",
            dlq_topic=f"bench-dlq-{name}",
            group_id=f"bench-{name}",
            bucket=f"bench-{name}",
            extra={**self.worker_env, **extra},
        )
        prepare(config, partitions=partitions)
        return config


def event(url: str, i: int) -> bytes:
    """A seed-format talk event (ids and timestamp as strings, md5 placeholder)."""
    ts = BASE_TS + i
    return json.dumps(
        {
            "msg_type": 1,
            "ip": "127.0.0.1",
            "ptt_msg": {
                "uid": str(i % 500),
                "grp_id": str(i % 17),
                "timestamp": str(ts),
                "file_path": url,
                "md5": "md5",
            },
        }
    ).encode()


def clip_url(base: str, tag: str, i: int) -> str:
    return f"{base}/c/{i}/room_1_user_{tag}_{i}_{BASE_TS + i}.mp3"


async def publish(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes],
    *,
    partitions: int = 1,
    rate: float | None = None,
) -> list[float]:
    """Publish ``values`` round-robin over partitions (paced at ``rate``/s if given);
    returns each value's send time (epoch seconds)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    sent: list[float] = []
    try:
        futures = []
        start = time.monotonic()
        for i, value in enumerate(values):
            if rate:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent.append(time.time())
            futures.append(await producer.send(topic, value, partition=i % partitions))
        for f in futures:
            await f
    finally:
        await producer.stop()
    return sent


class Proc:
    """CPU and memory of a child process, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def descendants(self) -> list[Proc]:
        """The processes below this one now (the worker's analysis children)."""
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        out: list[Proc] = []
        below = {self.pid}
        for pid, ppid in sorted(parents.items()):
            if ppid in below:
                below.add(pid)
                out.append(Proc(pid))
        return out

    def peak_kb(self) -> int:
        """Peak RSS (VmHWM); 0 once the process has ended."""
        try:
            return self.status_kb("VmHWM")
        except OSError:
            return 0

    def tree_cpu_s(self) -> float:
        """CPU of this process, of its live descendants and of the ended ones it reaped
        (cutime + cstime): the worker's analysis children count as the worker's CPU."""
        total = 0.0
        for proc in [self, *self.descendants()]:
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile: in its parent's cutime once reaped
                continue
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        return total

    def main_thread_cpu_s(self) -> float:
        path = Path(f"/proc/{self.pid}/task/{self.pid}/stat")
        fields = path.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status_kb(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0


def box_cpu_s() -> float:
    """Busy CPU seconds of the whole machine (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _db(url: str) -> Any:
    from sqlalchemy import create_engine

    return create_engine(url, pool_size=1)


ROWS_AND_FAILURES = (
    "SELECT (SELECT count(*) FROM recordings) + (SELECT count(*) FROM ingest_failures)"
)


def wait_rows(
    engine: Any,
    n: int,
    timeout: float,
    procs: Sequence[subprocess.Popen[bytes]],
    *,
    count_sql: str = ROWS_AND_FAILURES,
) -> None:
    """Poll until ``count_sql`` (by default ``recordings`` plus failures) reaches ``n``;
    fails when one of ``procs`` exits or at ``timeout``."""
    from sqlalchemy import text

    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            got = conn.execute(text(count_sql)).scalar_one()
        if got >= n:
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"process {p.args!r} exited with {p.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out with {got}/{n} rows")
        time.sleep(0.05)


@contextmanager
def workers(
    bench: Bench, config: Any, count: int, tag: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` worker processes (each with its own metrics port), stopped on exit."""
    from fileserver.devstack.servers import free_port
    from fileserver.devstack.stack import start_worker

    procs = []
    for i in range(count):
        env = {"FILESERVER_METRICS_PORT": str(free_port())}
        bench.metrics_ports.append(int(env["FILESERVER_METRICS_PORT"]))
        if bench.profile is None:
            procs.append(
                start_worker(
                    config, log_path=bench.workdir / f"worker-{tag}-{i}.log", extra_env=env
                )
            )
        else:  # the same worker under cProfile (bench/profile_worker.py)
            out = bench.profile / f"worker-{tag}-{i}.prof"
            with (bench.workdir / f"worker-{tag}-{i}.log").open("ab") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "bench.profile_worker", str(out)],
                        env={**os.environ, **config.env(), **env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
    try:
        yield procs
    finally:
        stop_processes(procs)


def stop_processes(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, then wait up to 30 s for each (SIGKILL after)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_stream(
    bench: Bench,
    case: str,
    n: int,
    *,
    workers_count: int = 1,
    partitions: int = 1,
    rate: float | None = None,
    urls: Callable[[str, int], str] | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 600,
) -> Run:
    """Start worker(s), warm up, publish ``n`` events, wait for their rows, measure."""
    from sqlalchemy import text

    config = bench.stack(partitions=partitions, **(extra_env or {}))
    engine = _db(config.database_url)
    tag = uuid.uuid4().hex[:6]
    make_url = urls or (lambda t, i: clip_url(bench.source_base, t, i))
    try:
        with workers(bench, config, workers_count, f"{case}-{tag}") as procs:
            warm = [
                event(clip_url(bench.source_base, "warm" + tag, i), i) for i in range(partitions)
            ]
            asyncio.run(publish(config.kafka_bootstrap, config.topic, warm, partitions=partitions))
            wait_rows(engine, partitions, 120, procs)
            time.sleep(0.5)
            with engine.connect() as conn:
                conn.execute(text("TRUNCATE recordings"))
                conn.commit()
            stats = [Proc(p.pid) for p in procs]
            idle0 = sum(s.tree_cpu_s() for s in stats)
            time.sleep(2.0)
            idle = (sum(s.tree_cpu_s() for s in stats) - idle0) / 2.0
            cpu0 = sum(s.tree_cpu_s() for s in stats)
            own0 = sum(s.cpu_s() for s in stats)
            box0 = box_cpu_s()
            servers = {name: Proc(pid) for name, pid in bench.server_pids().items()}
            servers0 = {name: p.cpu_s() for name, p in servers.items()}
            main0 = sum(s.main_thread_cpu_s() for s in stats)
            stages0 = stage_seconds(bench.metrics_ports[-workers_count:])
            values = [event(make_url(tag, i), i) for i in range(n)]
            sent = asyncio.run(
                publish(
                    config.kafka_bootstrap, config.topic, values, partitions=partitions, rate=rate
                )
            )
            wait_rows(engine, n, timeout, procs)
            cpu = sum(s.tree_cpu_s() for s in stats) - cpu0
            children_cpu = cpu - (sum(s.cpu_s() for s in stats) - own0)
            box = box_cpu_s() - box0
            server_cpu = {name: p.cpu_s() - servers0[name] for name, p in servers.items()}
            main_cpu = sum(s.main_thread_cpu_s() for s in stats) - main0
            stages1 = stage_seconds(bench.metrics_ports[-workers_count:])
            rss = max(s.status_kb("VmHWM") for s in stats) / 1024
            children = [c for s in stats for c in s.descendants()]
            children_rss = max((c.peak_kb() for c in children), default=0) / 1024
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT source_url, extract(epoch from ingested_at) FROM recordings")
                ).all()
                failures = conn.execute(text("SELECT count(*) FROM ingest_failures")).scalar_one()
    finally:
        engine.dispose()
    if failures:
        raise RuntimeError(f"{failures} events were dead-lettered (see {bench.workdir})")
    sent_at = {make_url(tag, i): sent[i] for i in range(n)}
    lat = sorted((float(at) - sent_at[url]) * 1000 for url, at in rows)
    last = max(float(at) for _url, at in rows)
    return Run(
        case=case,
        events=n,
        seconds=last - sent[0],
        workers=workers_count,
        cpu_ms_per_event=cpu * 1000 / n,
        peak_rss_mb=rss,
        p50_ms=lat[len(lat) // 2],
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        offered_rate=rate,
        extra={
            "main_thread_cpu_ms_per_event": round(main_cpu * 1000 / n, 2),
            # in cpu_ms_per_event already; the analysis children's part of it
            "children_cpu_ms_per_event": round(children_cpu * 1000 / n, 2),
            # not in peak_rss_mb (the worker process's own): the largest child's, each
            "children": len(children),
            "children_peak_rss_mb": round(children_rss, 1),
            "box_cpu_ms_per_event": round(box * 1000 / n, 2),
            "idle_worker_cpu_percent": round(idle * 100, 1),
            "server_cpu_ms_per_event": {k: round(v * 1000 / n, 2) for k, v in server_cpu.items()},
            "stage_mean_ms": {
                k: round(
                    (stages1[k][0] - stages0.get(k, (0.0, 0.0))[0])
                    * 1000
                    / max(1.0, stages1[k][1] - stages0.get(k, (0.0, 0.0))[1]),
                    2,
                )
                for k in stages1
            },
        },
    )


def stage_seconds(ports: Sequence[int]) -> dict[str, tuple[float, float]]:
    """Sum and count of each stage histogram of the workers' /metrics."""
    import urllib.request

    out: dict[str, list[float]] = {}
    for port in ports:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        for line in body.decode().splitlines():
            for suffix, idx in (("_sum", 0), ("_count", 1)):
                head = f"fileserver_stage_duration_seconds{suffix}{{stage="
                if line.startswith(head):
                    stage = line[len(head) :].split('"')[1]
                    out.setdefault(stage, [0.0, 0.0])[idx] += float(line.rsplit(" ", 1)[1])
    return {k: (v[0], v[1]) for k, v in out.items()}


async def _naive(config: Any, n: int) -> tuple[float, float]:
    """The sequential baseline; returns (seconds, cpu seconds of this process)."""
    import boto3
    import httpx
    import mutagen.mp3
    from aiokafka import AIOKafkaConsumer
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from fileserver.events import TalkEvent, object_key, parse_event
    from fileserver.models import Recording

    s3 = boto3.session.Session().client(
        "s3", endpoint_url=config.s3_endpoint_url, region_name=config.s3_region
    )
    engine = create_engine(config.database_url)
    http = httpx.Client()
    consumer = AIOKafkaConsumer(
        config.topic,
        bootstrap_servers=config.kafka_bootstrap,
        group_id=config.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    done = 0
    started = cpu0 = 0.0
    try:
        while done < n:
            msg = await consumer.getone()
            if done == 0:
                started, cpu0 = time.monotonic(), time.process_time()
            ev = parse_event(msg.value)
            assert isinstance(ev, TalkEvent)
            body = http.get(ev.file_path).raise_for_status().content
            md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
            audio: Any = mutagen.mp3.MP3(io.BytesIO(body))  # type: ignore[no-untyped-call]
            key = object_key(ev, md5)
            import base64

            s3.put_object(
                Bucket=config.bucket,
                Key=key,
                Body=body,
                ContentMD5=base64.b64encode(bytes.fromhex(md5)).decode(),
                ContentType="audio/mpeg",
            )
            with Session(engine) as session:
                session.add(
                    Recording(
                        uid=ev.uid,
                        grp_id=ev.grp_id,
                        m_type=ev.m_type,
                        source_url=ev.file_path,
                        source_ip=ev.source_ip,
                        event_time=ev.event_time,
                        md5=md5,
                        size_bytes=len(body),
                        duration_ms=int(audio.info.length * 1000),
                        bitrate=audio.info.bitrate,
                        sample_rate=audio.info.sample_rate,
                        channels=audio.info.channels,
                        s3_bucket=config.bucket,
                        s3_key=key,
                        kafka_topic=msg.topic,
                        kafka_partition=msg.partition,
                        kafka_offset=msg.offset,
                    )
                )
                session.commit()
            await consumer.commit()
            done += 1
        return time.monotonic() - started, time.process_time() - cpu0
    finally:
        await consumer.stop()
        http.close()
        engine.dispose()


def run_naive(bench: Bench, n: int) -> Run:
    config = bench.stack()
    tag = uuid.uuid4().hex[:6]
    values = [event(clip_url(bench.source_base, tag, i), i) for i in range(n)]
    asyncio.run(publish(config.kafka_bootstrap, config.topic, values))
    seconds, cpu = asyncio.run(_naive(config, n))
    return Run("naive", n, seconds, cpu_ms_per_event=cpu * 1000 / n)


def run_large(bench: Bench, size: int) -> Run:
    """One recording of ``size`` bytes (multipart upload); peak RSS of the worker."""
    from fileserver.devstack.samples import make_mp3

    path = bench.workdir / "clips" / "large.mp3"
    if not path.exists() or path.stat().st_size < size:
        block = make_mp3(60.0)
        with path.open("wb") as f:
            written = 0
            while written + len(block) <= size:
                f.write(block)
                written += len(block)
    real = path.stat().st_size
    env = {
        "FILESERVER_MAX_FILE_BYTES": str(2 * 1024**3),
        "FILESERVER_MAX_DURATION_S": str(10**7),
        "FILESERVER_FETCH_TIMEOUT_S": "1800",
        "FILESERVER_SHUTDOWN_GRACE_S": "5",
    }
    run = run_stream(
        bench,
        "large",
        1,
        urls=lambda t, i: f"{bench.source_base}/f/large.mp3?{t}",
        extra_env=env,
        timeout=1800,
    )
    run.extra["bytes"] = real
    run.extra["MB_per_s"] = real / 1e6 / run.seconds
    return run


def run_clips(bench: Bench, count: int = 64) -> Run:
    """``count`` one-minute clips at once; peak RSS of the worker."""
    env = {"FILESERVER_CONCURRENCY": str(count)}
    base = bench.source_base
    return run_stream(
        bench, "clips", count, urls=lambda t, i: f"{base}/f/minute.mp3?{t}-{i}", extra_env=env
    )


def _med(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(results: dict[str, list[Run]]) -> str:
    lines = [
        f"{'case':<22}{'runs':>5}{'events':>8}{'events/s':>10}{'cpu ms/ev':>10}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'RSS MB':>8}   each run (events/s)"
    ]
    for case, runs in results.items():
        rate = _fmt(_med([r.rate for r in runs]), ",.0f")
        lines.append(
            f"{case:<22}{len(runs):>5}{runs[0].events:>8}{rate:>10}"
            f"{_fmt(_med([r.cpu_ms_per_event for r in runs]), '.2f'):>10}"
            f"{_fmt(_med([r.p50_ms for r in runs]), '.0f'):>8}"
            f"{_fmt(_med([r.p99_ms for r in runs]), '.0f'):>8}"
            f"{_fmt(_med([r.peak_rss_mb for r in runs]), '.0f'):>8}   "
            + ", ".join(f"{r.rate:,.0f}" for r in runs)
        )
    if "throughput" in results and "naive" in results:
        ratio = (_med([r.rate for r in results["throughput"]]) or 0) / (
            _med([r.rate for r in results["naive"]]) or 1
        )
        lines.append(f"throughput / naive: {ratio:.1f}x")
    for k in SCALE_WORKERS[1:]:
        if "scale 1 worker" in results and _scale_name(k) in results:
            ratio = (_med([r.rate for r in results[_scale_name(k)]]) or 0) / (
                _med([r.rate for r in results["scale 1 worker"]]) or 1
            )
            lines.append(f"{k} workers / 1 worker: {ratio:.2f}x")
    return "\n".join(lines)


def _scale_name(workers: int, half: bool = False) -> str:
    name = f"scale {workers} worker{'s' if workers > 1 else ''}"
    return name + " at half" if half else name


def scale_table(results: dict[str, list[Run]]) -> str:
    """Scale-out as cost: per worker count, the maximum and the latency at half of the
    1-worker maximum (medians; CPU is the workers' together, per event)."""
    if _scale_name(1) not in results:
        return ""
    lines = [
        f"{'workers':>7}{'max events/s':>14}{'cpu ms/ev':>10}{'x 1 worker':>11}"
        f"{'offered/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'cpu ms/ev':>10}   p99 each run"
    ]
    one = _med([r.rate for r in results[_scale_name(1)]]) or 1
    for k in SCALE_WORKERS:
        top = results.get(_scale_name(k), [])
        half = results.get(_scale_name(k, half=True), [])
        rate = _med([r.rate for r in top])
        lines.append(
            f"{k:>7}{_fmt(rate, ',.0f'):>14}"
            f"{_fmt(_med([r.cpu_ms_per_event for r in top]), '.2f'):>10}"
            f"{_fmt(rate / one if rate else None, '.2f'):>11}"
            f"{_fmt(_med([r.offered_rate for r in half]), ',.0f'):>11}"
            f"{_fmt(_med([r.p50_ms for r in half]), '.0f'):>8}"
            f"{_fmt(_med([r.p99_ms for r in half]), '.0f'):>8}"
            f"{_fmt(_med([r.cpu_ms_per_event for r in half]), '.2f'):>10}   "
            + ", ".join(_fmt(r.p99_ms, ".0f") for r in half)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--case", default="throughput,naive", help=f"comma list of {CASES}")
    parser.add_argument("--events", type=int, default=5000, help="events per throughput run")
    parser.add_argument("--naive-events", type=int, default=600, help="events per naive run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument("--large-mb", type=int, default=1024, help="size of the large case")
    parser.add_argument(
        "--latency-rate",
        type=float,
        help="offered events/s of the latency runs (default: half the median maximum)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="defaults",
        help="worker settings: code defaults (http11 GET and PUT); the earlier deployment "
        "(aiohttp GET, http11 PUT); or aiohttp for both (the one before)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes of the throughput and latency runs (default 1)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        help="partitions of their topic (default: 1 for one worker, else 2 per worker)",
    )
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the worker")
    parser.add_argument(
        "--benthos",
        default="best,unbatched",
        help="Benthos configurations of the peers case (names in bench/peers.py)",
    )
    parser.add_argument(
        "--peers",
        default="fileserver,fileserver-analysis-off,benthos,naive",
        help="which peers the peers case runs (default: all)",
    )
    parser.add_argument("--label", default="", help="name of this configuration in the JSON")
    parser.add_argument("--profile", type=Path, help="run workers under cProfile, dump here")
    parser.add_argument("--workdir", type=Path, help="server data (default: a temp dir)")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.case.split(",") if c.strip()]
    if unknown := set(cases) - set(CASES):
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {CASES}")
    worker_env = {**PRESETS[args.preset], **dict(kv.split("=", 1) for kv in args.env)}

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fileserver.devstack.samples import make_mp3
    from fileserver.devstack.servers import free_port, port_open, start_postgres, start_seaweedfs
    from tests.servers.kafka import start_kafka

    results: dict[str, list[Run]] = {}
    with ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        else:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        clips = workdir / "clips"
        clips.mkdir(exist_ok=True)
        for k in range(N_CLIPS):
            (clips / f"clip-{k:03d}.mp3").write_bytes(make_mp3(3.0, freq_hz=200 + 10 * k))
        (clips / "minute.mp3").write_bytes(make_mp3(60.0))
        print(
            "starting Apache Kafka, SeaweedFS, Postgres and the source server ...", file=sys.stderr
        )
        kafka = stack.enter_context(start_kafka(workdir / "kafka"))
        s3 = stack.enter_context(start_seaweedfs(workdir / "seaweedfs"))
        pg = stack.enter_context(start_postgres(workdir / "postgres"))
        port = free_port()
        source = subprocess.Popen(
            [sys.executable, "-m", "bench.sources", "--port", str(port), "--clips", str(clips)],
            stdin=subprocess.DEVNULL,
        )

        def stop_source() -> None:
            source.terminate()
            source.wait(10)

        stack.callback(stop_source)
        while not port_open(port):
            time.sleep(0.05)
        for key, value in {
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        }.items():
            os.environ[key] = value
        bench = Bench(
            kafka.bootstrap,
            kafka.pid,
            s3,
            pg,
            f"http://127.0.0.1:{port}",
            workdir,
            worker_env,
            args.profile,
        )
        bench.source_pid = source.pid

        def record(run: Run, name: str | None = None) -> None:
            results.setdefault(name or run.case, []).append(run)
            print(
                f"{name or run.case}: {run.events:,} events in {run.seconds:.2f}s = "
                f"{run.rate:,.0f}/s cpu {_fmt(run.cpu_ms_per_event, '.2f')} ms/ev "
                f"p50 {_fmt(run.p50_ms, '.0f')} p99 {_fmt(run.p99_ms, '.0f')} ms "
                f"rss {_fmt(run.peak_rss_mb, '.0f')} MB {run.extra or ''}",
                file=sys.stderr,
            )

        layout = {
            "workers_count": args.workers,
            "partitions": args.partitions or (1 if args.workers == 1 else 2 * args.workers),
        }
        for _ in range(args.runs):
            if "throughput" in cases:
                record(run_stream(bench, "throughput", args.events, **layout))
            if "naive" in cases:
                record(run_naive(bench, args.naive_events))
            if "scale" in cases:
                for k in SCALE_WORKERS:
                    record(
                        run_stream(bench, "scale", args.events, partitions=4, workers_count=k),
                        _scale_name(k),
                    )
            if "clips" in cases:
                record(run_clips(bench))
        if "throughput" in cases:
            half = args.latency_rate or (_med([r.rate for r in results["throughput"]]) or 100) / 2
            n = max(500, min(args.events, int(half * 8)))
            for _ in range(args.runs):
                name = "latency at half max" if args.latency_rate is None else "latency"
                record(run_stream(bench, "throughput", n, rate=half, **layout), name)
        if "scale" in cases:
            half = (_med([r.rate for r in results[_scale_name(1)]]) or 100) / 2
            n = max(500, min(args.events, int(half * 8)))
            for k in SCALE_WORKERS:
                for _ in range(args.runs):
                    run = run_stream(bench, "scale", n, partitions=4, workers_count=k, rate=half)
                    record(run, _scale_name(k, half=True))
        if "peers" in cases:
            from bench.peers import run_peers

            names = [c.strip() for c in args.benthos.split(",") if c.strip()]
            kinds = [c.strip() for c in args.peers.split(",") if c.strip()]
            run_peers(bench, args.events, args.runs, names, record, kinds)
        if "large" in cases:
            record(run_large(bench, args.large_mb * 1024 * 1024))
        print(f"worker preset: {args.preset} {worker_env or ''}")
        print(table(results))
        if "scale" in cases:
            print(scale_table(results))
        if "peers" in cases:
            from bench.peers import peers_summary

            print(peers_summary(results))
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS / f"e2e-{stamp}.json"
        out.write_text(
            json.dumps(
                {
                    "benchmark": "end-to-end worker",
                    "label": args.label,
                    "preset": args.preset,
                    "argv": sys.argv,
                    "worker_env": worker_env,
                    "cpus": os.cpu_count(),
                    "cases": {
                        case: {
                            "median_events_per_s": _med([r.rate for r in runs]),
                            "runs": [asdict(r) | {"rate": r.rate} for r in runs],
                        }
                        for case, runs in results.items()
                    },
                },
                indent=2,
            )
        )
        print(f"results written to {out}", file=sys.stderr)
    return 0
