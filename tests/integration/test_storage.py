"""ObjectStore against a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fileserver.errors import DependencyUnavailable
from fileserver.runtime import make_s3_client
from fileserver.settings import Settings
from fileserver.storage import ObjectStore

MiB = 1024 * 1024


@pytest.fixture
def bucket(seaweed: Any) -> str:
    name = f"it-{uuid.uuid4().hex[:10]}"
    client(seaweed).create_bucket(Bucket=name)
    return name


def client(seaweed: Any, endpoint: str | None = None) -> Any:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", seaweed.access_key)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    settings = Settings(s3_endpoint_url=endpoint or seaweed.endpoint_url, s3_region=seaweed.region)
    return make_s3_client(settings)


def store(seaweed: Any, bucket: str, **kw: Any) -> ObjectStore:
    return ObjectStore(client(seaweed), bucket, ThreadPoolExecutor(4), **kw)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def test_single_put_round_trip_with_metadata(
    seaweed: Any, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(100_000)
    path = tmp_path / "a.mp3"
    path.write_bytes(data)
    s = store(seaweed, bucket)
    await s.put_file("1/14/2019/09/27/x.mp3", path, _md5(data), {"uid": "14", "md5": _md5(data)})
    got = client(seaweed).get_object(Bucket=bucket, Key="1/14/2019/09/27/x.mp3")
    assert got["Body"].read() == data
    assert got["ContentType"] == "audio/mpeg"
    assert got["Metadata"] == {"uid": "14", "md5": _md5(data)}
    head = await s.head("1/14/2019/09/27/x.mp3")
    assert head is not None and head.size == len(data)


async def test_store_rejects_a_wrong_content_md5(seaweed: Any, bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "a.mp3"
    path.write_bytes(b"the real bytes")
    s = store(seaweed, bucket)
    with pytest.raises(DependencyUnavailable, match=r"BadDigest|InvalidDigest"):
        await s.put_file("k.mp3", path, _md5(b"other bytes"), {})
    assert await s.head("k.mp3") is None


async def test_multipart_upload_is_byte_exact(seaweed: Any, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(12 * MiB + 123)
    path = tmp_path / "big.mp3"
    path.write_bytes(data)
    s = store(seaweed, bucket, multipart_threshold=5 * MiB, chunk_size=5 * MiB)
    await s.put_file("big.mp3", path, _md5(data), {"md5": _md5(data)})
    body = client(seaweed).get_object(Bucket=bucket, Key="big.mp3")["Body"].read()
    assert _md5(body) == _md5(data) and len(body) == len(data)


async def test_head_of_a_missing_object_is_none(seaweed: Any, bucket: str) -> None:
    assert await store(seaweed, bucket).head("nope.mp3") is None


async def test_missing_bucket_is_a_dependency_error(seaweed: Any) -> None:
    with pytest.raises(DependencyUnavailable, match="s3"):
        await store(seaweed, "no-such-bucket-here").check_bucket()


async def test_unreachable_endpoint_is_a_dependency_error(seaweed: Any, tmp_path: Path) -> None:
    from fileserver.devstack.servers import free_port

    s = ObjectStore(client(seaweed, f"http://127.0.0.1:{free_port()}"), "b", ThreadPoolExecutor(1))
    with pytest.raises(DependencyUnavailable, match="s3"):
        await s.check_bucket()
