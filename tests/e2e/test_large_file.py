"""A large recording round-trips byte-exact through a real worker (multipart upload).

~40 MiB with the multipart threshold and part size lowered to 5 MiB: the object's
bytes equal the source's, and the row's md5 and size are right. The 1 GiB case and
its memory bound are measured by ``python -m bench --case large``.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from fileserver.devstack.samples import SampleServer, make_mp3, talk_event
from fileserver.devstack.stack import StackConfig, publish, start_worker
from tests.helpers import count, query, stop_process, tail, wait_until

MIB = 1024 * 1024


def test_a_large_file_round_trips_byte_exact_through_multipart(
    kafka_stack: StackConfig, sample_server: SampleServer, tmp_path: Path
) -> None:
    stack = kafka_stack
    minute = make_mp3(60.0)
    data = minute * (40 * MIB // len(minute) + 1)  # ~40 MiB of valid CBR frames
    path = "/big/room_1_user_9_1569569697.mp3"
    sample_server.files[path] = data
    asyncio.run(publish(stack.kafka_bootstrap, stack.topic, [talk_event(sample_server.url(path))]))
    env = {
        "FILESERVER_MAX_FILE_BYTES": str(64 * MIB),
        "FILESERVER_MAX_DURATION_S": str(10**6),
        "FILESERVER_MULTIPART_THRESHOLD_BYTES": str(5 * MIB),
        "FILESERVER_MULTIPART_CHUNK_BYTES": str(5 * MIB),
    }
    log = tmp_path / "worker.log"
    worker = start_worker(stack, log_path=log, extra_env=env)
    try:
        wait_until(
            lambda: count(stack.database_url, "recordings") == 1,
            timeout=180,
            what=f"the large recording's row\n{tail(log)}",
        )
    finally:
        assert stop_process(worker) == 0, tail(log)
    assert count(stack.database_url, "ingest_failures") == 0
    (row,) = query(stack.database_url, "SELECT md5, size_bytes, s3_key FROM recordings")
    md5 = hashlib.md5(data).hexdigest()
    assert (row.md5, row.size_bytes) == (md5, len(data))
    s3 = stack.s3_client()
    head = s3.head_object(Bucket=stack.bucket, Key=row.s3_key)
    assert head["ContentLength"] == len(data)
    assert "-" in head["ETag"]  # a multipart ETag (md5-of-md5s "-" part count)
    body = s3.get_object(Bucket=stack.bucket, Key=row.s3_key)["Body"]
    digest = hashlib.md5()
    while chunk := body.read(MIB):
        digest.update(chunk)
    assert digest.hexdigest() == md5
