"""Peer benchmark (``python -m bench --case peers``): fileserver beside other ways of
doing the same job, on the same stack, in the same run.

The peers, each on its own 3-partition topic, consumer group, bucket and database
(``Bench.stack``), fed the same 3 s clips by the same source server:

* ``fileserver``: one ``fileserver worker`` process with the bench's preset (by default
  the code defaults), as the ``throughput`` case runs it; and ``fileserver, analysis
  off``, the same with ``FILESERVER_ANALYSIS_ENABLED=false`` (no peer analyses speech);
* ``benthos <config>``: Benthos v4.27.0 (``bench/peers/benthos/main.go``, built once and
  cached, see :func:`ensure_benthos`) running ``bench/peers/benthos/pipeline.yaml``
  with the tuning of one of :data:`BENTHOS_CONFIGS`; its rows go to its own table
  (:data:`BENTHOS_TABLE`);
* ``naive``: the sequential loop of ``bench/e2e.py`` (:func:`bench.e2e._naive`), here in
  a child process of its own so that its CPU and memory are read from /proc like the
  others'.

For each peer and run: the process is started, one warm-up event per partition is
published and awaited (the consumer has joined its group and holds every partition),
then ``--events`` events are published at once (a backlog) and awaited. Events/s is
``--events`` over the time from the first publish to the last row's insert time; p50/p99
are each row's insert time minus its event's publish time (durable = the row is in
Postgres); CPU per event is the process tree's utime+stime from /proc since it started
(fileserver's analysis children included; start-up, warm-up and the backlog, over the
backlog's events) and, apart, over the backlog alone; peak RSS is the main process's
VmHWM, ``children_peak_rss_mb`` its children's summed; ``machine_busy_cores`` is the
whole machine's busy CPU during the backlog (/proc/stat: other sessions on the machine
show there). The order of the peers rotates from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.e2e import (
    Bench,
    Proc,
    Run,
    _db,
    box_cpu_s,
    clip_url,
    event,
    publish,
    stop_processes,
    wait_rows,
    workers,
)
from tests.servers.toxiproxy import _file_lock, _ready  # the cache lock and "built" check

BENTHOS_VERSION = "4.27.0"
BENTHOS_DIR = Path(__file__).resolve().parent / "peers" / "benthos"
BENTHOS_TABLE = "benthos_recordings"
PARTITIONS = 3
# fileserver's defaults include the speech analysis of every burst, which no peer does:
# the same worker with it off is measured beside them too.
ANALYSIS_OFF = "peers: fileserver, analysis off"
_BUILD_TIMEOUT = 3600.0

# The table the Benthos peer writes: the columns of ``recordings`` it can fill (it has
# no MPEG analysis: no duration, bitrate, sample rate, channels or speech measures).
BENTHOS_TABLE_DDL = f"""
CREATE TABLE IF NOT EXISTS {BENTHOS_TABLE} (
    id bigserial PRIMARY KEY,
    uid bigint NOT NULL,
    grp_id bigint NOT NULL,
    source_url text NOT NULL UNIQUE,
    source_ip text,
    event_time timestamptz NOT NULL,
    md5 char(32) NOT NULL,
    size_bytes bigint NOT NULL,
    s3_bucket text NOT NULL,
    s3_key text NOT NULL,
    kafka_topic text NOT NULL,
    kafka_partition integer NOT NULL,
    kafka_offset bigint NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now()
)
"""


# --------------------------------------------------------------------------- the binary


def _source_hash() -> str:
    """Hash of what the binary is built from: main.go, go.mod and go.sum."""
    digest = hashlib.sha256()
    for name in ("main.go", "go.mod", "go.sum"):
        digest.update(name.encode() + b"\0" + (BENTHOS_DIR / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def benthos_binary_path() -> Path:
    """``$FILESERVER_BENTHOS_BIN``, or the user cache keyed by the sources' hash."""
    override = os.environ.get("FILESERVER_BENTHOS_BIN")
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fileserver-bench" / f"benthos-v{BENTHOS_VERSION}-{_source_hash()}"


def ensure_benthos(log: Callable[[str], None] | None = None) -> Path:
    """Build the Benthos peer with ``go build`` on first use; return the binary.

    Modules come from the Go module proxy (``go build -mod=readonly`` against the
    committed go.sum). A cold build takes ~5 minutes on a 2-core machine and fills the
    module cache with ~410 MB and the build cache with ~520 MB; progress (packages
    compiled, elapsed time) is printed every 15 s."""
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    binary = benthos_binary_path()
    if _ready(binary):
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            f"Go (`go`) is needed to build the Benthos v{BENTHOS_VERSION} peer into {binary}: "
            "install Go >= 1.21, or set FILESERVER_BENTHOS_BIN to a binary built from "
            f"{BENTHOS_DIR}"
        )
    with _file_lock(binary.parent / f".{binary.name}.lock"):
        if _ready(binary):
            return binary
        started = time.monotonic()
        say(f"building the Benthos v{BENTHOS_VERSION} peer into {binary} (minutes when cold) ...")
        with tempfile.TemporaryDirectory(prefix="benthos-", dir=binary.parent) as tmp:
            built = Path(tmp) / "benthos"
            # `-v` names each package as it is compiled: the progress count.
            proc = subprocess.Popen(
                [
                    go,
                    "build",
                    "-v",
                    "-mod=readonly",
                    "-trimpath",
                    "-buildvcs=false",
                    "-o",
                    str(built),
                    ".",
                ],
                cwd=BENTHOS_DIR,
                env={**os.environ, "CGO_ENABLED": "0"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert proc.stdout is not None
            lines: list[str] = []

            def progress() -> None:
                while proc.poll() is None:
                    time.sleep(15)
                    if proc.poll() is None:
                        say(
                            f"  ... {time.monotonic() - started:.0f}s, "
                            f"{len(lines)} packages compiled or downloaded"
                        )

            ticker = threading.Thread(target=progress, daemon=True)
            ticker.start()
            for line in proc.stdout:
                lines.append(line.rstrip())
                if time.monotonic() - started > _BUILD_TIMEOUT:
                    proc.kill()
            code = proc.wait()
            if code != 0 or not _ready(built):
                tail = "\n".join(lines[-40:])
                raise RuntimeError(f"`go build` of {BENTHOS_DIR} failed (exit {code}):\n{tail}")
            built.replace(binary)
        say(f"built the Benthos peer in {time.monotonic() - started:.0f}s")
    return binary


# --------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class BenthosConfig:
    """The tuning knobs of ``pipeline.yaml``."""

    threads: int
    checkpoint_limit: int = 1024
    s3_max_in_flight: int = 64
    sql_max_in_flight: int = 64
    sql_batch_count: int = 0  # 0 with an empty period: unbatched (one INSERT per event)
    sql_batch_period: str = ""
    input_batch_count: int = 0  # batches from the input: GETs in parallel, one INSERT each
    input_batch_period: str = ""

    def describe(self) -> str:
        batches = [
            f"{what} batches of {count}/{period or '-'}"
            for what, count, period in (
                ("input", self.input_batch_count, self.input_batch_period),
                ("sql", self.sql_batch_count, self.sql_batch_period),
            )
            if count or period
        ]
        return (
            f"threads {self.threads}, checkpoint_limit {self.checkpoint_limit}, "
            f"max_in_flight s3 {self.s3_max_in_flight} sql {self.sql_max_in_flight}, "
            + (", ".join(batches) or "unbatched")
        )


# Named configurations (``--benthos a,b``). "best" is the best found in the sweep
# recorded in bench/README.md ("Peers"); "unbatched" is the same without batching.
BENTHOS_CONFIGS: dict[str, BenthosConfig] = {
    "best": BenthosConfig(threads=16, sql_batch_count=16, sql_batch_period="10ms"),
    "unbatched": BenthosConfig(threads=16),
    **{f"t{t}": BenthosConfig(threads=t) for t in (2, 4, 8, 16, 64)},
    **{
        f"t{t}-sql{c}": BenthosConfig(threads=t, sql_batch_count=c, sql_batch_period="10ms")
        for t in (2, 4, 8, 16, 64)
        for c in (16, 64, 128)
    },
    **{
        f"t{t}-in{c}": BenthosConfig(threads=t, input_batch_count=c, input_batch_period="5ms")
        for t in (2, 4, 16)
        for c in (16, 64)
    },
    "t16-sql64-mif16": BenthosConfig(
        threads=16,
        s3_max_in_flight=16,
        sql_max_in_flight=16,
        sql_batch_count=64,
        sql_batch_period="10ms",
    ),
    "t16-sql64-cl256": BenthosConfig(
        threads=16, checkpoint_limit=256, sql_batch_count=64, sql_batch_period="10ms"
    ),
}


def postgres_dsn(database_url: str) -> str:
    """The ``postgres://`` DSN lib/pq takes for a SQLAlchemy URL."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(drivername="postgres")
    return url.render_as_string(hide_password=False) + "?sslmode=disable"


def render_pipeline(stack: Any, tuning: BenthosConfig, http_port: int) -> str:
    """``pipeline.yaml`` with its placeholders filled for ``stack`` (a StackConfig)."""
    values = {
        "HTTP_PORT": str(http_port),
        "KAFKA": stack.kafka_bootstrap,
        "TOPIC": stack.topic,
        "DLQ_TOPIC": stack.dlq_topic,
        "GROUP": stack.group_id,
        "BUCKET": stack.bucket,
        "S3_ENDPOINT": stack.s3_endpoint_url,
        "S3_REGION": stack.s3_region,
        "S3_ACCESS_KEY": stack.s3_access_key,
        "S3_SECRET_KEY": stack.s3_secret_key,
        "DSN": postgres_dsn(stack.database_url),
        "TABLE": BENTHOS_TABLE,
        "THREADS": str(tuning.threads),
        "CHECKPOINT_LIMIT": str(tuning.checkpoint_limit),
        "S3_MAX_IN_FLIGHT": str(tuning.s3_max_in_flight),
        "SQL_MAX_IN_FLIGHT": str(tuning.sql_max_in_flight),
        "SQL_BATCH_COUNT": str(tuning.sql_batch_count),
        "SQL_BATCH_PERIOD": tuning.sql_batch_period,
        "INPUT_BATCH_COUNT": str(tuning.input_batch_count),
        "INPUT_BATCH_PERIOD": tuning.input_batch_period,
        "HTTP_PARALLEL": "true" if tuning.input_batch_count else "false",
    }
    text = (BENTHOS_DIR / "pipeline.yaml").read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise RuntimeError(f"unfilled placeholder in pipeline.yaml: {text[text.index('{{') :]}")
    return text


def create_benthos_table(database_url: str) -> None:
    from sqlalchemy import text

    engine = _db(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(BENTHOS_TABLE_DDL))
    finally:
        engine.dispose()


def start_benthos(
    binary: Path, stack: Any, tuning: BenthosConfig, workdir: Path, tag: str
) -> subprocess.Popen[bytes]:
    """Write the pipeline for ``stack`` and start Benthos on it, logging beside it."""
    from fileserver.devstack.servers import free_port

    config_path = workdir / f"benthos-{tag}.yaml"
    config_path.write_text(render_pipeline(stack, tuning, free_port()))
    with (workdir / f"benthos-{tag}.log").open("ab") as log:
        return subprocess.Popen(
            [str(binary), "-c", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


# --------------------------------------------------------------------------- measuring


def measure_backlog(
    bench: Bench,
    name: str,
    stack: Any,
    procs: Sequence[subprocess.Popen[bytes]],
    table: str,
    n: int,
    timeout: float = 1800,
) -> Run:
    """Warm up ``procs`` (already started on ``stack``), publish ``n`` events at once,
    wait for their rows in ``table``, measure (see the module's docstring)."""
    from sqlalchemy import text

    engine = _db(stack.database_url)
    count_sql = f"SELECT count(*) FROM {table}"
    tag = uuid.uuid4().hex[:6]
    try:
        stats = [Proc(p.pid) for p in procs]
        warm = [event(clip_url(bench.source_base, "warm" + tag, i), i) for i in range(PARTITIONS)]
        asyncio.run(publish(stack.kafka_bootstrap, stack.topic, warm, partitions=PARTITIONS))
        wait_rows(engine, PARTITIONS, 180, procs, count_sql=count_sql)
        time.sleep(0.5)
        # the process tree: fileserver's analysis children count as fileserver's CPU
        cpu0 = sum(s.tree_cpu_s() for s in stats)
        box0, wall0 = box_cpu_s(), time.monotonic()
        values = [event(clip_url(bench.source_base, tag, i), i) for i in range(n)]
        sent = asyncio.run(
            publish(stack.kafka_bootstrap, stack.topic, values, partitions=PARTITIONS)
        )
        wait_rows(engine, PARTITIONS + n, timeout, procs, count_sql=count_sql)
        cpu_total = sum(s.tree_cpu_s() for s in stats)
        box_cores = (box_cpu_s() - box0) / (time.monotonic() - wall0)
        rss = max(s.status_kb("VmHWM") for s in stats) / 1024
        children = [c for s in stats for c in s.descendants()]
        children_rss = sum(c.peak_kb() for c in children) / 1024
        with engine.connect() as conn:
            rows = conn.execute(
                text(f"SELECT source_url, extract(epoch from ingested_at) FROM {table}")
            ).all()
    finally:
        engine.dispose()
    sent_at = {clip_url(bench.source_base, tag, i): sent[i] for i in range(n)}
    times = [(float(at), sent_at[url]) for url, at in rows if url in sent_at]
    if len(times) != n:
        raise RuntimeError(f"{name}: {len(times)} rows for {n} events")
    lat = sorted((at - pub) * 1000 for at, pub in times)
    last = max(at for at, _pub in times)
    return Run(
        case=name,
        events=n,
        seconds=last - sent[0],
        cpu_ms_per_event=cpu_total * 1000 / n,
        peak_rss_mb=rss,
        p50_ms=lat[len(lat) // 2],
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        extra={
            "steady_cpu_ms_per_event": round((cpu_total - cpu0) * 1000 / n, 3),
            "machine_busy_cores": round(box_cores, 2),
            # not in peak_rss_mb (the main process's VmHWM): the children's peaks, summed
            "children_peak_rss_mb": round(children_rss, 1),
        },
    )


def run_fileserver(bench: Bench, n: int, name: str, **extra_env: str) -> Run:
    stack = bench.stack(partitions=PARTITIONS, **extra_env)
    with workers(bench, stack, 1, f"peers-{uuid.uuid4().hex[:6]}") as procs:
        return measure_backlog(bench, name, stack, procs, "recordings", n)


def run_benthos(bench: Bench, binary: Path, config_name: str, n: int) -> Run:
    stack = bench.stack(partitions=PARTITIONS)
    create_benthos_table(stack.database_url)
    tuning = BENTHOS_CONFIGS[config_name]
    proc = start_benthos(binary, stack, tuning, bench.workdir, uuid.uuid4().hex[:6])
    try:
        run = measure_backlog(
            bench, f"peers: benthos {config_name}", stack, [proc], BENTHOS_TABLE, n
        )
    finally:
        stop_processes([proc])
    run.extra["benthos_config"] = tuning.describe()
    return run


def run_naive_process(bench: Bench, n: int) -> Run:
    stack = bench.stack(partitions=PARTITIONS)
    spec = json.dumps(dataclasses.asdict(stack) | {"extra": dict(stack.extra)})
    with (bench.workdir / f"naive-{uuid.uuid4().hex[:6]}.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.peers", "naive-child", spec],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        return measure_backlog(bench, "peers: naive", stack, [proc], "recordings", n)
    finally:
        stop_processes([proc])


PEER_KINDS = ("fileserver", "fileserver-analysis-off", "benthos", "naive")


def run_peers(
    bench: Bench,
    n: int,
    runs: int,
    benthos_configs: Sequence[str],
    record: Callable[[Run, str], None],
    kinds: Sequence[str] = PEER_KINDS,
) -> None:
    """The ``peers`` case: ``runs`` rounds of every peer of ``kinds`` (Benthos once per
    configuration), the order rotating per round."""
    if unknown := [c for c in benthos_configs if c not in BENTHOS_CONFIGS]:
        raise SystemExit(f"unknown Benthos configuration(s) {unknown}; {sorted(BENTHOS_CONFIGS)}")
    if unknown := [k for k in kinds if k not in PEER_KINDS]:
        raise SystemExit(f"unknown peer(s) {unknown}; choose from {PEER_KINDS}")
    binary = ensure_benthos() if "benthos" in kinds else Path()
    peers: list[tuple[str, Callable[[], Run]]] = []
    if "fileserver" in kinds:
        peers.append(("peers: fileserver", lambda: run_fileserver(bench, n, "peers: fileserver")))
    if "fileserver-analysis-off" in kinds:
        peers.append(
            (
                ANALYSIS_OFF,
                lambda: run_fileserver(bench, n, ANALYSIS_OFF, FILESERVER_ANALYSIS_ENABLED="false"),
            )
        )
    if "benthos" in kinds:
        for config in benthos_configs:
            peers.append(
                (f"peers: benthos {config}", partial(run_benthos, bench, binary, config, n))
            )
    if "naive" in kinds:
        peers.append(("peers: naive", lambda: run_naive_process(bench, n)))
    for round_ in range(runs):
        k = round_ % len(peers)
        for name, run in peers[k:] + peers[:k]:
            record(run(), name)


def peers_summary(results: dict[str, list[Run]]) -> str:
    """The peers' medians side by side, and fileserver's ratios to each."""
    from bench.e2e import _fmt, _med

    names = [k for k in results if k.startswith("peers: ")]
    if not names:
        return ""
    lines = [
        f"{'peer':<34}{'runs':>5}{'events/s':>10}{'p99 ms':>8}{'RSS MB':>8}"
        f"{'cpu ms/ev':>10}{'(steady)':>10}   each run (events/s)"
    ]
    med: dict[str, dict[str, float | None]] = {}
    for name in names:
        runs = results[name]
        med[name] = {
            "rate": _med([r.rate for r in runs]),
            "cpu": _med([r.cpu_ms_per_event for r in runs]),
        }
        steady = _med([r.extra.get("steady_cpu_ms_per_event") for r in runs])
        lines.append(
            f"{name[len('peers: ') :]:<34}{len(runs):>5}{_fmt(med[name]['rate'], ',.0f'):>10}"
            f"{_fmt(_med([r.p99_ms for r in runs]), '.0f'):>8}"
            f"{_fmt(_med([r.peak_rss_mb for r in runs]), '.0f'):>8}"
            f"{_fmt(med[name]['cpu'], '.2f'):>10}{_fmt(steady, '.2f'):>10}   "
            + ", ".join(f"{r.rate:,.0f}" for r in runs)
        )
    for mine in ("peers: fileserver", ANALYSIS_OFF):
        ours = med.get(mine)
        if not ours or not ours["rate"] or not ours["cpu"]:
            continue
        for name in names:
            if name.startswith("peers: fileserver") or not med[name]["rate"]:
                continue
            rate_ratio = ours["rate"] / (med[name]["rate"] or 1)
            cpu_ratio = ours["cpu"] / (med[name]["cpu"] or 1)
            lines.append(
                f"{mine[len('peers: ') :]} / {name[len('peers: ') :]}: "
                f"events/s {rate_ratio:.2f}x, cpu per event {cpu_ratio:.2f}x"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


def _naive_child(spec: str) -> int:
    """The naive loop in this process, until terminated (``run_naive_process``)."""
    from bench.e2e import _naive
    from fileserver.devstack.stack import StackConfig

    fields = json.loads(spec)
    fields["allowed_sources"] = tuple(fields["allowed_sources"])
    asyncio.run(_naive(StackConfig(**fields), 10**12))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("build", help="build (or find) the Benthos peer; print its path")
    child = sub.add_parser("naive-child", help="internal: the naive loop of the peers case")
    child.add_argument("spec")
    args = parser.parse_args(argv)
    if args.verb == "build":
        print(ensure_benthos())
        return 0
    return _naive_child(args.spec)


if __name__ == "__main__":
    sys.exit(main())
