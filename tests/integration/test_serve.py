"""``fileserver serve`` against real Postgres and SeaweedFS: auth (401/403), lists and
their keyset pagination under concurrent inserts, metadata, presigned URLs, the
streamed proxy with HTTP Range, the OpenAPI document, probes, metrics and the request
log (never the token)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from fileserver.devstack.samples import make_mp3
from fileserver.devstack.stack import StackConfig
from fileserver.migrate import upgrade
from fileserver.repository import NewRecording, Repository
from fileserver.runtime import make_engine
from fileserver.serve.app import ROUTES
from fileserver.serve.auth import token_hash
from fileserver.serve.command import Server, serving
from tests.helpers import query

FULL = "full-token-" + uuid.uuid4().hex
READ_ONLY = "read-token-" + uuid.uuid4().hex
T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Seeded:
    stack: StackConfig
    audio: dict[int, bytes]  # id -> the object's bytes
    groups: dict[int, list[int]]  # grp_id -> ids, newest first


def stack_for(seaweed: Any, database_url: str) -> StackConfig:
    return StackConfig(
        kafka_bootstrap="127.0.0.1:9",  # serve never talks to Kafka
        s3_endpoint_url=seaweed.endpoint_url,
        s3_access_key=seaweed.access_key,
        s3_secret_key=seaweed.secret_key,
        s3_region=seaweed.region,
        database_url=database_url,
        bucket=f"serve-{uuid.uuid4().hex[:10]}",
    )


async def seed(
    stack: StackConfig, bursts: list[tuple[int, int, float]], *, start: datetime = T0
) -> Seeded:
    """Upload one MP3 per ``(grp_id, uid, seconds)`` and insert its row through the
    repository; bursts are 30 s apart from ``start``, in the order given."""
    upgrade(stack.database_url)
    s3 = stack.s3_client()
    s3.create_bucket(Bucket=stack.bucket)
    engine = make_engine(stack.settings())
    repo = Repository(engine)
    audio: dict[int, bytes] = {}
    try:
        for i, (grp, uid, seconds) in enumerate(bursts):
            body = make_mp3(seconds, freq_hz=300 + 40 * i)
            md5 = hashlib.md5(body).hexdigest()
            when = start + timedelta(seconds=30 * i)
            key = f"{grp}/{uid}/{int(when.timestamp())}-{md5}.mp3"
            s3.put_object(Bucket=stack.bucket, Key=key, Body=body, ContentType="audio/mpeg")
            await repo.insert_recording(
                NewRecording(
                    uid=uid,
                    grp_id=grp,
                    m_type="audio/mpeg",
                    source_url=f"http://gw.example/{uuid.uuid4().hex}.mp3",
                    source_ip="10.0.0.1",
                    event_time=when,
                    md5=md5,
                    size_bytes=len(body),
                    duration_ms=int(seconds * 1000),
                    bitrate=24000,
                    sample_rate=16000,
                    channels=1,
                    s3_bucket=stack.bucket,
                    s3_key=key,
                    kafka_topic="events",
                    kafka_partition=0,
                    kafka_offset=i,
                )
            )
    finally:
        await repo.close()
        await engine.dispose()
    rows = query(stack.database_url, "SELECT id, grp_id, s3_key FROM recordings ORDER BY id")
    by_key = {
        f"{g}/{u}/{int((start + timedelta(seconds=30 * i)).timestamp())}": i
        for i, (g, u, _) in enumerate(bursts)
    }
    groups: dict[int, list[int]] = {}
    for r in rows:
        audio[int(r.id)] = s3.get_object(Bucket=stack.bucket, Key=r.s3_key)["Body"].read()
        groups.setdefault(int(r.grp_id), []).insert(0, int(r.id))
    assert len(by_key) == len(bursts)
    return Seeded(stack, audio, groups)


def execute(database_url: str, statement: str, **params: Any) -> None:
    """Run one statement and commit it."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


def serve_env(**extra: str) -> dict[str, str]:
    return {
        "FILESERVER_SERVE_TOKENS": f"{token_hash(FULL)},{token_hash(READ_ONLY)}:read",
        "FILESERVER_SERVE_PORT": "0",
        **extra,
    }


BURSTS = [(7, 101, 1.0), (7, 102, 2.0), (8, 101, 1.5), (7, 101, 0.5), (7, 103, 3.0)]


@pytest.fixture
async def seeded(
    seaweed: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Seeded]:
    stack = stack_for(seaweed, database_url)
    for k, v in stack.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    yield await seed(stack, BURSTS)


@pytest.fixture
async def server(seeded: Seeded) -> AsyncIterator[Server]:
    async with serving(seeded.stack.settings(**serve_env())) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def auth(token: str = FULL) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get_json(
    http: aiohttp.ClientSession, url: str, token: str | None = FULL, status: int = 200
) -> Any:
    async with http.get(url, headers=auth(token) if token else {}) as r:
        assert r.status == status, (r.status, await r.text())
        return await r.json()


async def test_tokens_401_403_and_the_log_never_holds_a_token(
    server: Server, seeded: Seeded, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fileserver.serve")
    one = seeded.groups[7][0]
    url = f"{server.url}/v1/recordings/{one}"
    async with http.get(url) as r:
        assert r.status == 401 and (await r.json())["error"] == "missing_token"
        assert r.headers["WWW-Authenticate"].startswith("Bearer ")
    async with http.get(url, headers={"Authorization": f"Basic {FULL}"}) as r:
        assert r.status == 401
    async with http.get(url, headers=auth("not-a-token")) as r:
        assert r.status == 401 and (await r.json())["error"] == "invalid_token"
    await get_json(http, url, READ_ONLY)  # read scope: metadata
    for audio_path in ("/audio", "/audio/url"):
        async with http.get(url + audio_path, headers=auth(READ_ONLY)) as r:
            assert r.status == 403 and (await r.json())["error"] == "insufficient_scope"
    await get_json(http, f"{server.url}/v1/recordings/999999999", status=404)
    await get_json(http, f"{server.url}/v1/recordings/abc", status=404)
    await get_json(http, f"{server.url}/v1/nothing-here", status=404)
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert FULL not in log and READ_ONLY not in log and "Bearer" not in log
    assert f"token={token_hash(FULL)[:12]}" in log and f"/v1/recordings/{one} 200" in log
    assert f"/v1/recordings/{one}/audio 403" in log and "token=-" in log


async def test_lists_by_group_uid_and_time_newest_first(
    server: Server, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    base = f"{server.url}/v1/recordings"
    page = await get_json(http, f"{base}?grp_id=7")
    assert [i["id"] for i in page["items"]] == seeded.groups[7] and page["next_cursor"] is None
    first = page["items"][0]
    assert first["grp_id"] == 7 and first["uid"] == 103 and first["duration_ms"] == 3000
    assert first["empty"] is None or isinstance(first["empty"], bool)
    uid = await get_json(http, f"{base}?uid=101")
    assert [(i["grp_id"], i["uid"]) for i in uid["items"]] == [(7, 101), (8, 101), (7, 101)]
    both = await get_json(http, f"{base}?uid=101&grp_id=7")
    assert len(both["items"]) == 2
    since = (T0 + timedelta(seconds=30)).isoformat()
    until = (T0 + timedelta(seconds=90)).isoformat()
    ranged = await get_json(http, f"{base}?since={since}&until={until}".replace("+", "%2B"))
    assert [i["uid"] for i in ranged["items"]] == [101, 102]  # bursts 2 and 1, not 3
    everything = await get_json(http, base)
    times = [i["event_time"] for i in everything["items"]]
    assert len(times) == 5 and times == sorted(times, reverse=True)
    groups = await get_json(http, f"{server.url}/v1/talkgroups")
    assert [g["grp_id"] for g in groups["items"]] == [7, 8]
    for bad in (
        "limit=0",
        "limit=501",
        "grp_id=x",
        "since=yesterday",
        "cursor=%21%21",
        "empty=maybe",
    ):
        body = await get_json(http, f"{base}?{bad}", status=400)
        assert body["error"] in ("bad_parameter", "bad_cursor"), body


async def test_pagination_is_stable_while_rows_arrive(
    server: Server, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    """Pages of 2 while bursts are inserted between pages, newer (the live case) and
    older than the position (a late event): nothing twice, nothing existing skipped,
    the late one older than the position met on a later page."""
    base = f"{server.url}/v1/recordings?grp_id=7&limit=2"
    page = await get_json(http, base)
    seen = [i["id"] for i in page["items"]]
    # a newer burst and a late one (older than every row so far) arrive
    await seed_more(seeded, [(7, 201, 1.0)], start=T0 + timedelta(hours=1))
    await seed_more(seeded, [(7, 202, 1.0)], start=T0 - timedelta(hours=1))
    while page["next_cursor"]:
        page = await get_json(http, f"{base}&cursor={page['next_cursor']}")
        seen += [i["id"] for i in page["items"]]
    assert len(seen) == len(set(seen)), seen
    ids = query(seeded.stack.database_url, "SELECT id, uid FROM recordings WHERE grp_id = 7")
    by_uid = {int(r.uid): int(r.id) for r in ids if r.uid in (201, 202)}
    # every row there was, once, in order; the late burst met at the end, in its place;
    # the newer one (newer than the first page) only on a fresh first page
    assert seen == [*seeded.groups[7], by_uid[202]]
    fresh = await get_json(http, base)
    assert fresh["items"][0]["id"] == by_uid[201]


async def seed_more(seeded: Seeded, bursts: list[tuple[int, int, float]], start: datetime) -> None:
    engine = make_engine(seeded.stack.settings())
    repo = Repository(engine)
    try:
        for grp, uid, seconds in bursts:
            await repo.insert_recording(
                NewRecording(
                    uid=uid,
                    grp_id=grp,
                    m_type="audio/mpeg",
                    source_url=f"http://gw.example/{uuid.uuid4().hex}.mp3",
                    source_ip=None,
                    event_time=start,
                    md5="0" * 32,
                    size_bytes=1,
                    duration_ms=int(seconds * 1000),
                    bitrate=24000,
                    sample_rate=16000,
                    channels=1,
                    s3_bucket=seeded.stack.bucket,
                    s3_key=f"missing/{uuid.uuid4().hex}.mp3",
                    kafka_topic="events",
                    kafka_partition=0,
                    kafka_offset=1000 + uid,
                )
            )
    finally:
        await repo.close()
        await engine.dispose()


async def test_empty_filter_once_the_column_exists(
    seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    """``empty`` is migration 0003's; on a database without it the filter is refused
    (400), with it (added here if 0003 has not landed) it filters."""
    url = seeded.stack.database_url
    has = query(
        url,
        "SELECT count(*) AS n FROM information_schema.columns "
        "WHERE table_name = 'recordings' AND column_name = 'empty'",
    )[0].n
    if not has:
        async with serving(seeded.stack.settings(**serve_env())) as server:
            body = await get_json(http, f"{server.url}/v1/recordings?empty=true", status=400)
            assert body["error"] == "not_available"
        execute(url, "ALTER TABLE recordings ADD COLUMN IF NOT EXISTS empty boolean")
    empty_ids = seeded.groups[7][1:3]
    execute(url, "UPDATE recordings SET empty = (id = ANY(:ids))", ids=empty_ids)
    async with serving(seeded.stack.settings(**serve_env())) as server:
        base = f"{server.url}/v1/recordings?grp_id=7"
        yes = await get_json(http, f"{base}&empty=true")
        assert [i["id"] for i in yes["items"]] == empty_ids
        assert all(i["empty"] is True for i in yes["items"])
        no = await get_json(http, f"{base}&empty=false&limit=1")
        ids = [i["id"] for i in no["items"]]
        while no["next_cursor"]:
            no = await get_json(http, f"{base}&empty=false&limit=1&cursor={no['next_cursor']}")
            ids += [i["id"] for i in no["items"]]
        assert ids == [i for i in seeded.groups[7] if i not in empty_ids]


async def test_metadata_presigned_url_and_the_proxy_with_ranges(
    server: Server, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    rid = seeded.groups[7][0]
    body = seeded.audio[rid]
    meta = await get_json(http, f"{server.url}/v1/recordings/{rid}")
    assert meta["md5"] == hashlib.md5(body).hexdigest() and meta["size_bytes"] == len(body)
    assert meta["links"]["audio"] == f"/v1/recordings/{rid}/audio"
    link = await get_json(http, f"{server.url}/v1/recordings/{rid}/audio/url")
    assert link["expires_in"] == 300 and "X-Amz-Signature" in link["url"]
    async with http.get(link["url"]) as r:  # no token: the URL is the credential
        assert r.status == 200 and await r.read() == body
        assert r.headers["Content-Type"] == "audio/mpeg"
    async with http.get(
        f"{server.url}/v1/recordings/{rid}/audio/url?redirect=true",
        headers=auth(),
        allow_redirects=False,
    ) as r:
        assert r.status == 307 and "X-Amz-Signature" in r.headers["Location"]
    audio = f"{server.url}/v1/recordings/{rid}/audio"
    async with http.get(audio, headers=auth()) as r:
        assert r.status == 200 and await r.read() == body
        assert r.headers["Accept-Ranges"] == "bytes" and r.headers["Content-Type"] == "audio/mpeg"
    cases = {
        "bytes=10-19": (206, body[10:20], f"bytes 10-19/{len(body)}"),
        "bytes=-5": (206, body[-5:], f"bytes {len(body) - 5}-{len(body) - 1}/{len(body)}"),
        f"bytes={len(body) - 3}-": (206, body[-3:], None),
        "bytes=0-1,5-6": (200, body, None),  # several ranges: ignored, the whole file
    }
    for rng, (status, want, content_range) in cases.items():
        async with http.get(audio, headers={**auth(), "Range": rng}) as r:
            assert r.status == status, (rng, r.status)
            assert await r.read() == want, rng
            if content_range:
                assert r.headers["Content-Range"] == content_range
    async with http.get(audio, headers={**auth(), "Range": f"bytes={len(body) + 10}-"}) as r:
        assert r.status == 416
    async with http.head(audio, headers=auth()) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(body)
    # a row whose object is gone: 502, named
    seeded.stack.s3_client().delete_object(Bucket=seeded.stack.bucket, Key=meta["s3_key"])
    async with http.get(audio, headers=auth()) as r:
        assert r.status == 502 and (await r.json())["error"] == "object_missing"


async def test_openapi_probes_and_metrics(server: Server, http: aiohttp.ClientSession) -> None:
    doc = await get_json(http, f"{server.url}/openapi.json", token=None)
    assert doc["openapi"].startswith("3.1") and set(doc["paths"]) == {p for p, _, _ in ROUTES}
    for path, _, scope in ROUTES:
        security = doc["paths"][path]["get"].get("security")
        assert security == ([{"bearer": [scope]}] if scope else []), path
    assert (await get_json(http, f"{server.url}/healthz", token=None))["status"] == "alive"
    ready = await get_json(http, f"{server.url}/readyz", token=None)
    assert ready["ready"] is True and ready["checks"] == {"postgres": "ok", "s3": "ok"}
    async with http.get(f"{server.url}/review") as r:
        html = await r.text()
        assert r.status == 200 and 'id="timeline"' in html
        assert "script-src 'sha256-" in r.headers["Content-Security-Policy"]
    async with http.get(f"{server.url}/metrics") as r:
        text = await r.text()
    assert 'fileserver_serve_requests_total{route="/openapi.json",status="200"} 1.0' in text
    assert "fileserver_serve_request_seconds_bucket" in text


async def test_start_refuses_without_tokens_or_schema(
    seaweed: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fileserver.errors import ConfigError

    stack = stack_for(seaweed, database_url)
    with pytest.raises(ConfigError, match="FILESERVER_SERVE_TOKENS is empty"):
        async with serving(stack.settings(FILESERVER_SERVE_PORT="0")):
            pass
    with pytest.raises(ConfigError, match="SHA-256"):
        async with serving(stack.settings(FILESERVER_SERVE_TOKENS="abc")):
            pass
    with pytest.raises(ConfigError, match="fileserver migrate"):
        async with serving(stack.settings(**serve_env())):
            pass


# --- breaks found by the third adversarial review, kept as regression tests ---------------
# Each failed before its fix (500s on out-of-range integers and non-UTF-8 tokens, a token in
# the query string logged, Range edge cases passed to S3 unchanged).

BIG = str(2**63)  # one past bigint's maximum
HUGE = "9" * 30


def cursor_of(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


async def status_of(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, bytes]:
    async with http.get(url, headers={**auth(), **headers}) as r:
        return r.status, await r.read()


@pytest.mark.parametrize(
    "query", [f"grp_id={BIG}", f"grp_id=-{BIG}1", f"uid={HUGE}", f"uid=-{HUGE}"]
)
async def test_an_out_of_range_integer_filter_is_400_not_500(
    server: Server, http: aiohttp.ClientSession, query: str
) -> None:
    status, body = await status_of(http, f"{server.url}/v1/recordings?{query}")
    assert status == 400, (query, status, body[:80])


@pytest.mark.parametrize("suffix", ["", "/audio/url", "/audio"])
@pytest.mark.parametrize("rid", [BIG, HUGE])
async def test_an_out_of_range_recording_id_is_404_not_500(
    server: Server, http: aiohttp.ClientSession, rid: str, suffix: str
) -> None:
    status, body = await status_of(http, f"{server.url}/v1/recordings/{rid}{suffix}")
    assert status == 404, (rid, suffix, status, body[:80])


@pytest.mark.parametrize("raw", [f"1:0:{HUGE}", f"1:0:-{BIG}1", f"1:0:{BIG}"])
async def test_a_cursor_with_an_out_of_range_id_is_400_not_500(
    server: Server, http: aiohttp.ClientSession, raw: str
) -> None:
    status, body = await status_of(http, f"{server.url}/v1/recordings?cursor={cursor_of(raw)}")
    assert status == 400, (raw, status, body[:80])


async def test_a_non_utf8_bearer_token_is_401_not_500(server: Server) -> None:
    host, port = server.url.split("//")[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"GET /v1/talkgroups HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\xfe\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 401 Unauthorized", answer[:200]


async def test_a_token_sent_in_the_query_string_is_not_logged(
    server: Server, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fileserver.serve")
    async with http.get(f"{server.url}/v1/recordings?access_token={FULL}") as r:
        assert r.status == 401
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert FULL not in log, [line for line in log.splitlines() if FULL in line]


async def test_a_range_whose_last_byte_is_past_the_end_is_206_not_416(
    server: Server, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    rid = seeded.groups[7][0]
    body = seeded.audio[rid]
    # RFC 9110 14.1.2: a last-pos >= the length means "to the end"; 0- is satisfiable
    status, got = await status_of(
        http, f"{server.url}/v1/recordings/{rid}/audio", Range=f"bytes=0-{HUGE}"
    )
    assert (status, got) == (206, body), (status, len(got))


async def test_an_invalid_range_is_ignored_not_416(
    server: Server, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    rid = seeded.groups[7][0]
    body = seeded.audio[rid]
    # RFC 9110 14.1.1: last-pos < first-pos makes the range-spec invalid: the Range header
    # is ignored (200, whole body); 416 is only for a valid but unsatisfiable range
    status, got = await status_of(
        http, f"{server.url}/v1/recordings/{rid}/audio", Range="bytes=5-2"
    )
    assert (status, got) == (200, body), (status, len(got))
