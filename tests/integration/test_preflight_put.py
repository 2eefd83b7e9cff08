"""The preflight's signed PUT + DELETE through the event-loop PUT path
(:func:`fileserver.preflight.check_fast_put`), on each fast transport (http11, aiohttp):

* against SeaweedFS: it passes and leaves nothing in the bucket; a secret the store
  refuses fails it, naming what to change;
* against a loopback S3 double whose bucket lives in another region than the one
  configured, which answers as S3 does (a HEAD signed for the wrong region: 400 with
  ``x-amz-bucket-region``; any other request: 400 ``AuthorizationHeaderMalformed`` with
  ``<Region>``): boto3's bucket check passes (botocore follows the region) while the
  probe fails naming FILESERVER_S3_REGION. The same double answers AccessDenied, 503, or
  nothing at all for the other outcomes and their exit statuses.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import boto3
import pytest

from fileserver import exits
from fileserver.errors import ConfigError
from fileserver.preflight import check_bucket, check_fast_put
from fileserver.runtime import make_s3_client, make_s3_putter
from fileserver.settings import Settings
from fileserver.storage import ObjectStore
from fileserver.storage.s3_put import PREFLIGHT_KEY
from tests.integration.test_s3_wire import (
    _AUTH,
    ACCESS_KEY,
    BUCKET,
    SECRET_KEY,
    FakeS3,
    Request,
    signature_ok,
)

FAST = ["http11", "aiohttp"]
BUCKET_REGION = "eu-central-1"


@contextmanager
def fast_store(
    settings: Settings,
    *,
    access: str = ACCESS_KEY,
    secret: str = SECRET_KEY,
    putter_secret: str | None = None,
) -> Iterator[ObjectStore]:
    """An ObjectStore with the putter of ``settings.s3_transport``, wired as the worker
    wires them; ``putter_secret``: another secret for the putter only."""
    good = boto3.session.Session(aws_access_key_id=access, aws_secret_access_key=secret)
    putter_session = boto3.session.Session(
        aws_access_key_id=access, aws_secret_access_key=putter_secret or secret
    )
    client = make_s3_client(settings, good)
    putter = make_s3_putter(settings, client, putter_session)
    with ThreadPoolExecutor(2) as executor:
        yield ObjectStore(client, settings.s3_bucket, executor, putter=putter)


async def close(store: ObjectStore) -> None:
    assert store.putter is not None
    await store.putter.sender.aclose()


# ----------------------------------------------------------------------------- SeaweedFS


@pytest.fixture
def seaweed_bucket(seaweed: Any) -> str:
    name = f"pf-{uuid.uuid4().hex[:10]}"
    seaweed.client().create_bucket(Bucket=name)
    return name


def seaweed_settings(seaweed: Any, bucket: str, transport: str) -> Settings:
    return Settings(
        s3_endpoint_url=seaweed.endpoint_url,
        s3_region=seaweed.region,
        s3_bucket=bucket,
        s3_transport=transport,
    )


@pytest.mark.parametrize("transport", FAST)
async def test_the_probe_passes_on_seaweedfs_and_leaves_nothing(
    seaweed: Any, seaweed_bucket: str, transport: str
) -> None:
    settings = seaweed_settings(seaweed, seaweed_bucket, transport)
    with fast_store(settings, access=seaweed.access_key, secret=seaweed.secret_key) as store:
        try:
            await check_bucket(settings, store)
            await check_fast_put(settings, store)
            await check_fast_put(settings, store)  # a second start: same key, same outcome
        finally:
            await close(store)
    assert seaweed.client().list_objects_v2(Bucket=seaweed_bucket).get("KeyCount") == 0


@pytest.mark.parametrize("transport", FAST)
async def test_a_secret_seaweedfs_refuses_fails_the_probe_naming_what_to_change(
    seaweed: Any, seaweed_bucket: str, transport: str
) -> None:
    settings = seaweed_settings(seaweed, seaweed_bucket, transport)
    with fast_store(
        settings, access=seaweed.access_key, secret=seaweed.secret_key, putter_secret="wrong"
    ) as store:
        try:
            with pytest.raises(ConfigError) as info:
                await check_fast_put(settings, store)
        finally:
            await close(store)
    message = str(info.value)
    assert (
        f"a signed PUT of '{PREFLIGHT_KEY}' into FILESERVER_S3_BUCKET={seaweed_bucket}" in message
    )
    assert f"through FILESERVER_S3_TRANSPORT={transport} was refused" in message
    assert "SignatureDoesNotMatch" in message
    assert "set FILESERVER_S3_TRANSPORT=boto3" in message
    assert exits.status_for(info.value) == exits.USAGE
    assert seaweed.client().list_objects_v2(Bucket=seaweed_bucket).get("KeyCount") == 0


# ---------------------------------------------------------------------------- the double


class BucketElsewhere(FakeS3):
    """An S3 double whose bucket is in ``region``; requests must be well signed (else
    403 SignatureDoesNotMatch). Signed for another region: answered as S3 does. In the
    right region: HEAD 200, DELETE ``delete`` (204 or 403), PUT ``put``: ``ok`` (200),
    ``denied`` (403 AccessDenied), ``busy`` (503 SlowDown) or ``silent``."""

    def __init__(self, region: str, *, put: str = "ok", delete: int = 204) -> None:
        super().__init__("verify")
        self.region = region
        self.put = put
        self.delete = delete

    def _answer(self, request: Request) -> bytes | str:
        method, _target, headers, body = request
        if not signature_ok(request):
            return answer(403, error("SignatureDoesNotMatch", "recompute"))
        match = _AUTH.fullmatch(headers["authorization"])
        assert match is not None
        signed_for = match["scope"].split("/")[1]
        if signed_for != self.region:
            if method == "HEAD":  # S3's HeadBucket: no body, the region in a header
                return answer(400, b"", {"x-amz-bucket-region": self.region})
            message = f"the region '{signed_for}' is wrong; expecting '{self.region}'"
            return answer(
                400,
                error("AuthorizationHeaderMalformed", message, f"<Region>{self.region}</Region>"),
            )
        if method == "HEAD":
            return answer(200, b"", {"x-amz-bucket-region": self.region})
        if method == "DELETE":
            return answer(self.delete, b"" if self.delete == 204 else error("AccessDenied", "no"))
        if self.put == "silent":
            return "silent"
        return {
            "ok": answer(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}),
            "denied": answer(403, error("AccessDenied", "Access Denied")),
            "busy": answer(503, error("SlowDown", "Please reduce your request rate.")),
        }[self.put]


def error(code: str, message: str, extra: str = "") -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message>{extra}<RequestId>R</RequestId></Error>"
    ).encode()


def answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (head + "\r\n").encode() + body


@asynccontextmanager
async def bucket_elsewhere(**kw: Any) -> AsyncIterator[BucketElsewhere]:
    server = BucketElsewhere(BUCKET_REGION, **kw)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


def double_settings(port: int, transport: str, region: str) -> Settings:
    return Settings(
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        s3_region=region,
        s3_bucket=BUCKET,
        s3_transport=transport,
        connect_timeout_s=0.5,
        read_timeout_s=1.0,
    )


def calls(s3: FakeS3) -> list[tuple[str, str]]:
    return [(method, target) for method, target, _h, _b in s3.requests]


@pytest.mark.parametrize("transport", FAST)
async def test_a_region_mismatch_passes_the_bucket_check_and_fails_the_probe(
    transport: str,
) -> None:
    async with bucket_elsewhere() as s3:
        settings = double_settings(s3.port, transport, "us-east-1")
        with fast_store(settings) as store:
            try:
                await check_bucket(settings, store)  # botocore follows x-amz-bucket-region
                with pytest.raises(ConfigError) as info:
                    await check_fast_put(settings, store)
            finally:
                await close(store)
    assert calls(s3) == [("HEAD", "/rec"), ("HEAD", "/rec"), ("PUT", f"/rec/{PREFLIGHT_KEY}")]
    message = str(info.value)
    assert "AuthorizationHeaderMalformed" in message
    assert "the PUT was signed for region 'us-east-1'" in message
    assert f"(the store says the bucket is in '{BUCKET_REGION}')" in message
    assert "set FILESERVER_S3_REGION to the bucket's region" in message
    assert exits.status_for(info.value) == exits.USAGE


@pytest.mark.parametrize("transport", FAST)
async def test_the_right_region_puts_and_deletes_the_probe(transport: str) -> None:
    async with bucket_elsewhere() as s3:
        settings = double_settings(s3.port, transport, BUCKET_REGION)
        with fast_store(settings) as store:
            try:
                await check_bucket(settings, store)
                await check_fast_put(settings, store)
            finally:
                await close(store)
    key = f"/rec/{PREFLIGHT_KEY}"
    assert calls(s3) == [("HEAD", "/rec"), ("PUT", key), ("DELETE", key)]
    put_headers = s3.requests[1][2]
    assert "content-md5" in put_headers and put_headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/"
    )


@pytest.mark.parametrize("transport", FAST)
async def test_a_put_the_credentials_may_not_do_names_the_permission(transport: str) -> None:
    async with bucket_elsewhere(put="denied") as s3:
        settings = double_settings(s3.port, transport, BUCKET_REGION)
        with fast_store(settings) as store:
            try:
                with pytest.raises(ConfigError) as info:
                    await check_fast_put(settings, store)
            finally:
                await close(store)
    assert "AccessDenied" in str(info.value)
    assert f"grant s3:PutObject on arn:aws:s3:::{BUCKET}/*" in str(info.value)
    assert exits.status_for(info.value) == exits.USAGE


@pytest.mark.parametrize("transport", FAST)
async def test_a_signature_only_the_fast_path_gets_wrong_points_at_boto3(transport: str) -> None:
    async with bucket_elsewhere() as s3:
        settings = double_settings(s3.port, transport, BUCKET_REGION)
        with fast_store(settings, putter_secret="stale") as store:
            try:
                await check_bucket(settings, store)
                with pytest.raises(ConfigError) as info:
                    await check_fast_put(settings, store)
            finally:
                await close(store)
    assert "SignatureDoesNotMatch" in str(info.value)
    assert "although boto3's HeadBucket passed" in str(info.value)
    assert "set FILESERVER_S3_TRANSPORT=boto3" in str(info.value)


@pytest.mark.parametrize("transport", FAST)
@pytest.mark.parametrize(
    ("put", "said"), [("busy", "SlowDown"), ("silent", r"no answer within 1(\.5)? s")]
)
async def test_a_store_that_fails_or_never_answers_is_unreachable_not_misconfigured(
    transport: str, put: str, said: str
) -> None:
    async with bucket_elsewhere(put=put) as s3:
        settings = double_settings(s3.port, transport, BUCKET_REGION)
        with fast_store(settings) as store:
            try:
                with pytest.raises(ConfigError, match=said) as info:
                    await check_fast_put(settings, store)
            finally:
                await close(store)
    assert "FILESERVER_S3_ENDPOINT_URL=http://127.0.0.1:" in str(info.value)
    assert exits.status_for(info.value) == exits.UNREACHABLE


@pytest.mark.parametrize("transport", FAST)
async def test_a_delete_the_credentials_may_not_do_is_only_logged(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with bucket_elsewhere(delete=403) as s3:
        settings = double_settings(s3.port, transport, BUCKET_REGION)
        with fast_store(settings) as store, caplog.at_level(logging.WARNING, "fileserver"):
            try:
                await check_fast_put(settings, store)
            finally:
                await close(store)
    assert [m for m, _t in calls(s3)] == ["PUT", "DELETE"]
    assert f"could not delete the probe object '{PREFLIGHT_KEY}'" in caplog.text
    assert "AccessDenied" in caplog.text


async def test_the_boto3_transport_has_no_probe() -> None:
    settings = double_settings(1, "boto3", BUCKET_REGION)
    with ThreadPoolExecutor(1) as executor:
        store = ObjectStore(make_s3_client(settings), BUCKET, executor)
        await check_fast_put(settings, store)  # nothing sent: port 1 would refuse
