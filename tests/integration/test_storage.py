"""ObjectStore and the PUT senders against each real S3 server: SeaweedFS, S3Proxy, versitygw.

Every test that talks to a server runs once per server (the ``s3_server`` fixture of
tests/conftest.py) and, where it puts, once per transport (FILESERVER_S3_TRANSPORT:
boto3, aiohttp, http11). The servers run path-style in us-east-1; see the fixture.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import boto3
import pytest

from fileserver.errors import DependencyUnavailable
from fileserver.runtime import make_s3_client
from fileserver.settings import Settings
from fileserver.storage import FAST_PUT_MAX_BYTES, ListedObject, ObjectStore, http11
from fileserver.storage.s3_put import (
    AiohttpSender,
    Http11Sender,
    S3Putter,
    Sender,
    object_url_prefix,
)

MiB = 1024 * 1024


@pytest.fixture
def bucket(s3_server: Any) -> str:
    name = f"it-{uuid.uuid4().hex[:10]}"
    client(s3_server).create_bucket(Bucket=name)
    return name


def client(server: Any, endpoint: str | None = None) -> Any:
    """fileserver's boto3 client (make_s3_client) for ``server``, with its credentials.

    The credentials go in a session, not the environment: each server has its own.
    """
    session = boto3.session.Session(
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key
    )
    settings = Settings(s3_endpoint_url=endpoint or server.endpoint_url, s3_region=server.region)
    return make_s3_client(settings, session)


def store(server: Any, bucket: str, **kw: Any) -> ObjectStore:
    return ObjectStore(client(server), bucket, ThreadPoolExecutor(4), **kw)


SENDERS = ["aiohttp", "http11"]


def sender(kind: str, endpoint: str) -> Sender:
    """A sender of FILESERVER_S3_TRANSPORT=``kind`` to ``endpoint``."""
    if kind == "aiohttp":
        return AiohttpSender(aiohttp.ClientSession(), timeout_s=10)
    return Http11Sender(http11.Pool(http11.origin_of(endpoint)), timeout_s=10)


@pytest.fixture(params=["boto3", *SENDERS])
async def put_store(request: Any, s3_server: Any, bucket: str) -> Any:
    """An ObjectStore on each S3 transport (FILESERVER_S3_TRANSPORT)."""
    if request.param == "boto3":
        yield store(s3_server, bucket)
        return
    fast = putter(s3_server, request.param, bucket)
    try:
        yield store(s3_server, bucket, putter=fast)
    finally:
        await fast.sender.aclose()


def putter(server: Any, kind: str, bucket: str, secret: str | None = None) -> S3Putter:
    session = boto3.session.Session(
        aws_access_key_id=server.access_key,
        aws_secret_access_key=secret or server.secret_key,
    )
    return S3Putter.for_client(
        sender(kind, server.endpoint_url),
        client(server),
        bucket,
        credentials=session.get_credentials(),
    )


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


async def first(listing: AsyncIterator[ListedObject], limit: int) -> list[ListedObject]:
    """At most ``limit`` objects of ``listing``: a listing that starts over (a server's
    continuation token that leads back to the first page) fails the test, not hangs it."""
    listed: list[ListedObject] = []
    async with asyncio.timeout(60):
        async for obj in listing:
            listed.append(obj)
            if len(listed) >= limit:
                break
    return listed


async def test_single_put_round_trip_with_metadata(
    s3_server: Any, bucket: str, tmp_path: Path, put_store: ObjectStore
) -> None:
    data = os.urandom(100_000)
    path = tmp_path / "a.mp3"
    path.write_bytes(data)
    s = put_store
    await s.put_file("1/14/2019/09/27/x.mp3", path, _md5(data), {"uid": "14", "md5": _md5(data)})
    got = client(s3_server).get_object(Bucket=bucket, Key="1/14/2019/09/27/x.mp3")
    assert got["Body"].read() == data
    assert got["ContentType"] == "audio/mpeg"
    assert got["Metadata"] == {"uid": "14", "md5": _md5(data)}
    head = await s.head("1/14/2019/09/27/x.mp3")
    assert head is not None and head.size == len(data)


async def test_store_rejects_a_wrong_content_md5(tmp_path: Path, put_store: ObjectStore) -> None:
    path = tmp_path / "a.mp3"
    path.write_bytes(b"the real bytes")
    s = put_store
    with pytest.raises(DependencyUnavailable, match=r"BadDigest|InvalidDigest"):
        await s.put_file("k.mp3", path, _md5(b"other bytes"), {})
    assert await s.head("k.mp3") is None


async def test_multipart_upload_is_byte_exact(s3_server: Any, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(12 * MiB + 123)
    path = tmp_path / "big.mp3"
    path.write_bytes(data)
    s = store(s3_server, bucket, multipart_threshold=5 * MiB, chunk_size=5 * MiB)
    await s.put_file("big.mp3", path, _md5(data), {"md5": _md5(data)})
    body = client(s3_server).get_object(Bucket=bucket, Key="big.mp3")["Body"].read()
    assert _md5(body) == _md5(data) and len(body) == len(data)


async def test_head_of_a_missing_object_is_none(s3_server: Any, bucket: str) -> None:
    assert await store(s3_server, bucket).head("nope.mp3") is None


async def test_head_gives_the_etag_without_quotes(s3_server: Any, bucket: str) -> None:
    data = b"some bytes"
    s = store(s3_server, bucket)
    await s.put_file("e.mp3", data, _md5(data), {"md5": _md5(data)})
    head = await s.head("e.mp3")
    assert head is not None and (head.etag, head.metadata) == (_md5(data), {"md5": _md5(data)})


async def test_listing_pages_through_every_object_in_byte_order(
    s3_server: Any, bucket: str
) -> None:
    keys = ["b/2.mp3", "a/1.mp3", "a/10.mp3", "Z.mp3", "\u00e9.mp3", "a/1.mp3x", "~.mp3"]
    s3 = client(s3_server)
    for i, key in enumerate(keys):
        s3.put_object(Bucket=bucket, Key=key, Body=b"x" * i)
    s = store(s3_server, bucket)
    listed = await first(s.list_objects(page_size=2), len(keys) + 2)  # four pages
    assert [o.key for o in listed] == sorted(keys, key=str.encode)
    by_key = {o.key: o for o in listed}
    for i, key in enumerate(keys):
        assert by_key[key].size == i and by_key[key].etag == _md5(b"x" * i)
        assert by_key[key].last_modified.tzinfo is not None
    assert [o async for o in store(s3_server, bucket).list_objects()] == listed


async def test_listing_an_empty_bucket_yields_nothing(s3_server: Any, bucket: str) -> None:
    assert [o async for o in store(s3_server, bucket).list_objects()] == []


async def test_listing_a_missing_bucket_is_a_dependency_error(s3_server: Any) -> None:
    with pytest.raises(DependencyUnavailable, match="NoSuchBucket"):
        [o async for o in store(s3_server, "no-such-bucket-here").list_objects()]


async def test_move_copies_with_metadata_then_deletes(s3_server: Any, bucket: str) -> None:
    data = b"stray bytes"
    s = store(s3_server, bucket)
    await s.put_file("stray.mp3", data, _md5(data), {"md5": _md5(data), "uid": "7"})
    await s.move("stray.mp3", "quarantine/stray.mp3")
    assert await s.head("stray.mp3") is None
    moved = client(s3_server).get_object(Bucket=bucket, Key="quarantine/stray.mp3")
    assert moved["Body"].read() == data
    assert moved["Metadata"] == {"md5": _md5(data), "uid": "7"}


async def test_moving_a_missing_object_is_a_dependency_error(s3_server: Any, bucket: str) -> None:
    s = store(s3_server, bucket)
    with pytest.raises(DependencyUnavailable, match="NoSuchKey"):
        await s.move("nope.mp3", "quarantine/nope.mp3")
    assert await s.head("quarantine/nope.mp3") is None


async def test_missing_bucket_is_a_dependency_error(s3_server: Any) -> None:
    with pytest.raises(DependencyUnavailable, match="s3"):
        await store(s3_server, "no-such-bucket-here").check_bucket()


async def test_unreachable_endpoint_is_a_dependency_error(tmp_path: Path) -> None:
    from fileserver.devstack.servers import free_port

    nobody = SimpleNamespace(access_key="a", secret_key="b", region="us-east-1")
    dead = client(nobody, f"http://127.0.0.1:{free_port()}")
    s = ObjectStore(dead, "b", ThreadPoolExecutor(1))
    with pytest.raises(DependencyUnavailable, match="s3"):
        await s.check_bucket()


@pytest.mark.parametrize("kind", SENDERS)
async def test_putter_leaves_large_objects_to_boto3(
    s3_server: Any, bucket: str, tmp_path: Path, kind: str
) -> None:
    data = os.urandom(FAST_PUT_MAX_BYTES + 1)
    path = tmp_path / "big.mp3"
    path.write_bytes(data)
    small = tmp_path / "small.mp3"
    small.write_bytes(b"x")
    fast = putter(s3_server, kind, bucket)
    calls: list[str] = []
    original = fast.put

    async def spy(key: str, *args: Any) -> None:
        calls.append(key)
        await original(key, *args)

    fast.put = spy  # type: ignore[method-assign]
    s = store(s3_server, bucket, putter=fast)
    try:
        await s.put_file("big.mp3", path, _md5(data), {})
        await s.put_file("small.mp3", small, _md5(b"x"), {})
    finally:
        await fast.sender.aclose()
    assert calls == ["small.mp3"]
    body = client(s3_server).get_object(Bucket=bucket, Key="big.mp3")["Body"].read()
    assert body == data


@pytest.mark.parametrize("kind", SENDERS)
async def test_putter_reports_bad_credentials_and_missing_bucket(
    s3_server: Any, bucket: str, kind: str
) -> None:
    wrong = putter(s3_server, kind, bucket, secret="not-the-secret")
    missing = putter(s3_server, kind, "no-such-bucket-here")
    try:
        with pytest.raises(DependencyUnavailable, match=r"SignatureDoesNotMatch|AccessDenied"):
            await wrong.put("a.mp3", b"abc", _md5(b"abc"), "audio/mpeg", {})
        with pytest.raises(DependencyUnavailable, match="NoSuchBucket"):
            await missing.put("a.mp3", b"abc", _md5(b"abc"), "audio/mpeg", {})
    finally:
        await wrong.sender.aclose()
        await missing.sender.aclose()
    assert client(s3_server).list_objects_v2(Bucket=bucket).get("KeyCount") == 0


@pytest.mark.parametrize(
    ("kind", "error"), [("aiohttp", "ClientConnectorError"), ("http11", "ConnectError")]
)
async def test_putter_unreachable_endpoint(kind: str, error: str) -> None:
    from fileserver.devstack.servers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    dead = S3Putter(
        sender(kind, endpoint),
        prefix=f"{endpoint}/b/",
        bucket="b",
        credentials=boto3.session.Session(
            aws_access_key_id="a", aws_secret_access_key="b"
        ).get_credentials(),
        region="us-east-1",
    )
    try:
        with pytest.raises(DependencyUnavailable, match=rf"s3.*{error}"):
            await dead.put("a.mp3", b"abc", _md5(b"abc"), "audio/mpeg", {})
    finally:
        await dead.sender.aclose()


async def test_http11_putter_keeps_connections_alive(s3_server: Any, bucket: str) -> None:
    """Many PUTs at a time reuse a bounded set of kept-alive connections."""
    pool = http11.Pool(http11.origin_of(s3_server.endpoint_url), limit=4)
    fast = S3Putter.for_client(
        Http11Sender(pool, timeout_s=10),
        client(s3_server),
        bucket,
        credentials=boto3.session.Session(
            aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key
        ).get_credentials(),
    )
    bodies = {f"k/{i}.mp3": os.urandom(1000 + i) for i in range(40)}
    opened: list[int] = []
    original = pool._connect

    async def counting() -> Any:
        conn = await original()
        opened.append(1)
        return conn

    pool._connect = counting  # type: ignore[method-assign]
    try:
        await asyncio.gather(
            *(fast.put(k, b, _md5(b), "audio/mpeg", {}) for k, b in bodies.items())
        )
        assert 1 <= len(opened) <= 4 and pool.open_connections == len(opened)
    finally:
        await pool.aclose()
    assert pool.open_connections == 0
    for key, body in bodies.items():
        assert client(s3_server).get_object(Bucket=bucket, Key=key)["Body"].read() == body


def test_object_url_prefix_follows_botocore_addressing(s3_server: Any) -> None:
    assert (
        object_url_prefix(client(s3_server), "my-bucket") == f"{s3_server.endpoint_url}/my-bucket/"
    )
    aws = boto3.session.Session(
        aws_access_key_id="a", aws_secret_access_key="b", region_name="eu-west-1"
    ).client("s3")
    assert object_url_prefix(aws, "my-bucket") == "https://my-bucket.s3.amazonaws.com/"


async def test_in_memory_content_round_trips(
    s3_server: Any, bucket: str, put_store: ObjectStore
) -> None:
    data = os.urandom(9_300)
    await put_store.put_file("mem.mp3", data, _md5(data), {"md5": _md5(data)})
    got = client(s3_server).get_object(Bucket=bucket, Key="mem.mp3")
    assert got["Body"].read() == data and got["Metadata"] == {"md5": _md5(data)}
    with pytest.raises(DependencyUnavailable, match=r"BadDigest|InvalidDigest"):
        await put_store.put_file("bad.mp3", data, _md5(b"other"), {})
    assert await put_store.head("bad.mp3") is None
