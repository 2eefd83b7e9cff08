"""``fileserver dev``: the embedded stack (Tansu, SeaweedFS, Postgres) running the worker.

Everything runs from wheels of the ``[dev]`` extra on free loopback ports; Ctrl-C
stops every process this command started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from fileserver.devstack.samples import (
    QUALITY_EVENT,
    SIGNAL_EVENT,
    SampleServer,
    make_mp3,
    talk_event,
)
from fileserver.devstack.stack import StackConfig, prepare, publish, start_serve, start_worker

log = logging.getLogger("fileserver.dev")

LANDING_TIMEOUT_S = 60.0


def _database_url(workdir: Path, stack: ExitStack) -> str:
    """FILESERVER_DATABASE_URL when it answers, else an embedded Postgres."""
    from fileserver.devstack.servers import start_postgres

    url = os.environ.get("FILESERVER_DATABASE_URL")
    if url:
        try:
            with create_engine(url).connect() as conn:
                conn.execute(text("SELECT 1"))
            print("using the database at FILESERVER_DATABASE_URL")
            return url
        except Exception as exc:
            print(
                f"FILESERVER_DATABASE_URL does not answer ({type(exc).__name__}); "
                "starting an embedded Postgres"
            )
    pg = stack.enter_context(start_postgres(workdir / "postgres"))
    return pg.url


def sample_batch(server: SampleServer, count: int) -> tuple[list[Any], int, int]:
    """Sample records: ``count`` good talk events, a msg_type 2 and 3, and bad ones.

    Returns the records, how many should become rows, and how many dead letters.
    """
    now = int(time.time())
    records: list[Any] = []
    for i in range(count):
        path = f"/room_1_user_{14 + i}_{now + i}.mp3"
        server.files[path] = make_mp3(2.0 + i % 3, freq_hz=300 + 50 * i)
        records.append(talk_event(server.url(path), uid=str(14 + i), timestamp=now + i))
    server.files["/not_audio.mp3"] = b"<html>gateway error page</html>" * 20
    records += [
        SIGNAL_EVENT,
        QUALITY_EVENT,
        b'{"msg_type": 1, "ptt_msg": ',  # malformed JSON
        {"msg_type": 1, "ip": "127.0.0.1", "ptt_msg": {"uid": "abc"}},  # invalid event
        talk_event(server.url("/room_1_user_99_404.mp3"), uid="99", timestamp=now),  # 404
        talk_event(server.url("/not_audio.mp3"), uid="98", timestamp=now),  # not MP3
    ]
    return records, count, 4


def _counts(database_url: str) -> tuple[int, int]:
    with create_engine(database_url).connect() as conn:
        rows = conn.execute(text("SELECT count(*) FROM recordings")).scalar_one()
        dead = conn.execute(text("SELECT count(*) FROM ingest_failures")).scalar_one()
    return int(rows), int(dead)


def print_landed(database_url: str) -> None:
    """Print the rows and dead letters in the database."""
    engine = create_engine(database_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT uid, grp_id, duration_ms, size_bytes, md5, s3_key FROM recordings "
                "ORDER BY id"
            )
        ).all()
        dead = conn.execute(
            text(
                "SELECT kafka_partition, kafka_offset, reason, detail FROM ingest_failures "
                "ORDER BY id"
            )
        ).all()
    engine.dispose()
    print(f"\nrecordings ({len(rows)} rows):")
    for r in rows:
        print(
            f"  uid={r.uid:<4} grp={r.grp_id:<3} {r.duration_ms:>6} ms {r.size_bytes:>7} B "
            f"md5={r.md5}  s3://{r.s3_key}"
        )
    print(f"dead letters ({len(dead)}):")
    for d in dead:
        print(f"  p{d.kafka_partition}/o{d.kafka_offset:<4} {d.reason:<16} {d.detail[:90]}")


def run_dev(args: argparse.Namespace) -> int:
    """Start the stack, publish samples, run the worker; wait for Ctrl-C."""
    from fileserver.devstack.servers import start_seaweedfs, start_tansu

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fileserver-dev-"))
    root.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        print(f"fileserver dev: servers keep their data and logs under {root}")
        tansu = stack.enter_context(start_tansu(root / "tansu"))
        print(f"  Kafka protocol (Tansu)  {tansu.bootstrap}")
        s3 = stack.enter_context(start_seaweedfs(root / "seaweedfs"))
        print(f"  S3 (SeaweedFS)          {s3.endpoint_url}")
        database_url = _database_url(root, stack)
        print("  Postgres                ready")
        server = stack.enter_context(SampleServer())
        print(f"  sample recordings       {server.base_url}")
        config = StackConfig(
            kafka_bootstrap=tansu.bootstrap,
            s3_endpoint_url=s3.endpoint_url,
            s3_access_key=s3.access_key,
            s3_secret_key=s3.secret_key,
            s3_region=s3.region,
            database_url=database_url,
        )
        prepare(config)
        records, want_rows, want_dead = sample_batch(server, args.samples)
        asyncio.run(publish(config.kafka_bootstrap, config.topic, records))
        print(
            f"published {len(records)} sample records to {config.topic} "
            f"({want_rows} talk bursts, 1 msg_type 2, 1 msg_type 3, 4 bad ones)"
        )
        worker_log = root / "worker.log"
        worker = start_worker(config, log_path=worker_log)
        stack.callback(_stop, worker)
        print(f"worker started (pid {worker.pid}, log {worker_log})")
        serve, review_url = _start_serve(config, root)
        stack.callback(_stop, serve)
        deadline = time.monotonic() + LANDING_TIMEOUT_S
        while time.monotonic() < deadline and worker.poll() is None:
            rows, dead = _counts(database_url)
            if rows >= want_rows and dead >= want_dead:
                break
            time.sleep(0.5)
        if worker.poll() is not None:
            print(f"the worker exited with code {worker.returncode}; see {worker_log}")
            return 1
        print_landed(database_url)
        rows, dead = _counts(database_url)
        ok = rows >= want_rows and dead >= want_dead
        if not ok:
            print(
                f"expected {want_rows} rows and {want_dead} dead letters within "
                f"{LANDING_TIMEOUT_S:.0f}s; see {worker_log}"
            )
        ok = _await_serve(serve, review_url, root / "serve.log") and ok
        if args.exit_after_samples:
            return 0 if ok else 1
        _print_howto(config, server)
        try:
            while worker.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            print("\nstopping every process fileserver dev started...")
            return 0
        print(f"the worker exited with code {worker.returncode}; see {worker_log}")
        return 1
    return 0


def _start_serve(config: StackConfig, root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``fileserver serve`` with a fresh token; the page's URL carries the token in
    its fragment (never sent to the server)."""
    from fileserver.devstack.servers import free_port
    from fileserver.serve.auth import new_token

    token, digest = new_token()
    port = free_port()
    serve = start_serve(
        config,
        log_path=root / "serve.log",
        extra_env={"FILESERVER_SERVE_TOKENS": digest, "FILESERVER_SERVE_PORT": str(port)},
    )
    print(f"serve started (pid {serve.pid}, log {root / 'serve.log'})")
    return serve, f"http://127.0.0.1:{port}/review#token={token}"


def _await_serve(serve: subprocess.Popen[bytes], review_url: str, log_path: Path) -> bool:
    """Wait for ``serve`` to be ready, then print the review page's URL."""
    import urllib.request

    base = review_url.split("/review", 1)[0]
    deadline = time.monotonic() + 30
    while serve.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    token = review_url.rsplit("=", 1)[1]
                    print(
                        f"\nreview page (the token is in the fragment):\n  {review_url}\n"
                        f"API: {base}/openapi.json, e.g.\n"
                        f"  curl -H 'Authorization: Bearer {token}' '{base}/v1/recordings?limit=5'"
                    )
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    print(f"fileserver serve did not become ready; see {log_path}")
    return False


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=40)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _print_howto(config: StackConfig, server: SampleServer) -> None:
    example = json.dumps(talk_event(server.url("/room_1_user_14_1569569695.mp3")))
    env = " ".join(f"{k}={v}" for k, v in config.env().items() if k.startswith("FILESERVER_"))
    print(
        f"""
The stack keeps running. To publish more events (bootstrap {config.kafka_bootstrap}):

  {sys.executable} -c 'import asyncio, sys; from fileserver.devstack.stack import publish; \\
asyncio.run(publish("{config.kafka_bootstrap}", "{config.topic}", [sys.argv[1]]))' '{example}'

Recordings are served from {server.base_url}/<path> (add files by restarting with
--samples N). To point other tools at this stack:

  {env}

Ctrl-C stops everything."""
    )
