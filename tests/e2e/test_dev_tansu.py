"""`fileserver dev` end to end on the embedded stack (Tansu + SeaweedFS + Postgres).

The smoke test that keeps the dev stack honest: seed-format samples become rows and
dead letters through a real worker process on the Tansu broker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_dev_command_lands_the_samples(tmp_path: Path, postgres_server_url: str) -> None:
    from fileserver.devstack.servers import create_database

    env = dict(os.environ)
    # Reuse the suite's Postgres server (a fresh database) to keep the test quick;
    # the embedded-Postgres branch of `fileserver dev` is exercised when this is unset.
    env["FILESERVER_DATABASE_URL"] = create_database(postgres_server_url, "dev_smoke")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fileserver",
            "dev",
            "--workdir",
            str(tmp_path),
            "--samples",
            "4",
            "--exit-after-samples",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    worker_log = tmp_path / "worker.log"
    assert proc.returncode == 0, out + (worker_log.read_text() if worker_log.exists() else "")
    assert "recordings (4 rows):" in out
    assert "dead letters (4):" in out
    for reason in ("malformed_json", "invalid_event", "source_not_found", "invalid_audio"):
        assert reason in out
