"""The aiohttp application of ``fileserver serve``.

Routes (the OpenAPI document, :mod:`fileserver.serve.openapi`, describes each):

* ``GET /v1/recordings``: list, newest first, keyset-paginated (scope ``read``);
* ``GET /v1/recordings/{id}``: one recording's metadata (``read``);
* ``GET /v1/recordings/{id}/audio/url``: a presigned S3 URL as JSON, or a 307 to it with
  ``?redirect=true`` (``listen``);
* ``GET /v1/recordings/{id}/audio``: the audio streamed through this server, with HTTP
  Range (``listen``);
* ``GET /v1/talkgroups``: the talk groups that have recordings (``read``);
* open: ``/openapi.json``, ``/review`` (the page; it holds no data, it calls the API
  with the token the user gives it), ``/healthz``, ``/readyz``, ``/metrics``.

Every request is logged once (method, path and query, status, time, the token's id:
the first 12 hex digits of its hash, never the token or the ``Authorization`` header).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from fileserver.db.reads import Reads, RecordingFilter, RecordingView
from fileserver.errors import DependencyUnavailable
from fileserver.serve import audio, cursor, openapi, page
from fileserver.serve.auth import Denied, Grant, TokenTable
from fileserver.web import Readiness

log = logging.getLogger("fileserver.serve")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GRANT: web.RequestKey[Grant] = web.RequestKey("grant", Grant)


class ServeMetrics:
    """``fileserver_serve_*`` in a registry of its own (plus the process collector)."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fileserver_serve_requests",
            "HTTP requests answered by fileserver serve, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "fileserver_serve_request_seconds",
            "Time to answer a request (a streamed body included), by route",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.audio_bytes = Counter(
            "fileserver_serve_audio_bytes",
            "Audio bytes streamed by the proxy",
            registry=self.registry,
        )
        if process:
            ProcessCollector(registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass
class Services:
    """What the handlers use."""

    reads: Reads
    presigner: audio.Presigner
    http: aiohttp.ClientSession
    tokens: TokenTable
    readiness: Readiness
    metrics: ServeMetrics


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def error_response(status: int, error: str, detail: str) -> web.Response:
    resp = web.json_response({"error": error, "detail": detail}, status=status)
    if status == 401:
        resp.headers["WWW-Authenticate"] = f'Bearer realm="fileserver", error="{error}"'
    elif status == 403:
        resp.headers["WWW-Authenticate"] = (
            f'Bearer realm="fileserver", error="insufficient_scope", error_description="{detail}"'
        )
    return resp


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


def recording_json(row: RecordingView) -> dict[str, Any]:
    base = f"/v1/recordings/{row.id}"
    return {
        "id": row.id,
        "uid": row.uid,
        "grp_id": row.grp_id,
        "event_time": _iso(row.event_time),
        "duration_ms": row.duration_ms,
        "size_bytes": row.size_bytes,
        "md5": row.md5.strip(),
        "m_type": row.m_type,
        "bitrate": row.bitrate,
        "sample_rate": row.sample_rate,
        "channels": row.channels,
        "source_ip": row.source_ip,
        "s3_bucket": row.s3_bucket,
        "s3_key": row.s3_key,
        "ingested_at": _iso(row.ingested_at),
        "empty": row.empty,
        "analysis": {k: _jsonable(v) for k, v in row.analysis.items() if k != "empty"},
        "links": {"self": base, "audio": f"{base}/audio", "audio_url": f"{base}/audio/url"},
    }


#: ids and numbers are Postgres BIGINT: anything outside is no row and a bad request,
#: never a "bigint out of range" error from the database
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
#: query parameters whose values are logged; any other (a token by mistake) is masked
LOGGED_PARAMS = frozenset({"grp_id", "uid", "since", "until", "empty", "limit", "redirect"})


def _bigint(raw: str) -> int | None:
    """``raw`` as a canonical decimal BIGINT (ASCII digits, optional minus), else None."""
    text = raw.strip()
    digits = text[1:] if text.startswith("-") else text
    if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
        return None
    value = int(text)
    return value if BIGINT_MIN <= value <= BIGINT_MAX else None


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    value = _bigint(raw)
    if value is None:
        raise ApiError(400, "bad_parameter", f"{name}={raw[:40]!r} is not a 64-bit integer")
    return value


def _loggable(request: web.Request) -> str:
    """The request's path and query with every value not in :data:`LOGGED_PARAMS`
    masked: a client that puts its token in the query string must not put it in our log."""
    if not request.query:
        return request.path
    parts = [
        f"{key}={value if key in LOGGED_PARAMS else '***'}" for key, value in request.query.items()
    ]
    return f"{request.path}?{'&'.join(parts)}"


def _time_param(request: web.Request, name: str) -> datetime | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        parsed = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ApiError(
            400, "bad_parameter", f"{name}={raw!r} is not an ISO-8601 time (2024-05-01T08:30Z)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _bool_param(request: web.Request, name: str) -> bool | None:
    raw = (request.query.get(name) or "").strip().lower()
    if raw == "":
        return None
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise ApiError(400, "bad_parameter", f"{name}={raw!r} must be true or false")


class Api:
    """The handlers."""

    def __init__(self, services: Services) -> None:
        self.s = services

    async def list_recordings(self, request: web.Request) -> web.Response:
        where = RecordingFilter(
            grp_id=_int_param(request, "grp_id"),
            uid=_int_param(request, "uid"),
            since=_time_param(request, "since"),
            until=_time_param(request, "until"),
            empty=_bool_param(request, "empty"),
        )
        if where.empty is not None and not self.s.reads.has_empty:
            raise ApiError(
                400, "not_available", "the database has no speech analysis yet (migration 0003)"
            )
        limit = _int_param(request, "limit")
        limit = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(400, "bad_parameter", f"limit must be 1..{MAX_LIMIT}")
        after = None
        if request.query.get("cursor"):
            try:
                after = cursor.decode(request.query["cursor"])
            except cursor.BadCursor as exc:
                raise ApiError(400, "bad_cursor", str(exc)) from None
        rows = await self.s.reads.list_recordings(where, limit + 1, after)
        more = len(rows) > limit
        rows = rows[:limit]
        return web.json_response(
            {
                "items": [recording_json(r) for r in rows],
                "next_cursor": cursor.encode(rows[-1].position) if more else None,
            }
        )

    async def _row(self, request: web.Request) -> RecordingView:
        raw = request.match_info["id"]
        recording_id = _bigint(raw)
        if recording_id is None or raw != str(recording_id):
            raise ApiError(404, "not_found", f"no recording {raw[:40]!r}")
        row = await self.s.reads.recording(recording_id)
        if row is None:
            raise ApiError(404, "not_found", f"no recording {recording_id}")
        return row

    async def get_recording(self, request: web.Request) -> web.Response:
        return web.json_response(recording_json(await self._row(request)))

    async def audio_url(self, request: web.Request) -> web.Response:
        row = await self._row(request)
        url = await self.s.presigner.url(row)
        if _bool_param(request, "redirect"):
            raise web.HTTPTemporaryRedirect(url, headers={"Cache-Control": "no-store"})
        ttl = self.s.presigner.ttl_s
        return web.json_response(
            {
                "url": url,
                "expires_in": ttl,
                "expires_at": _iso(datetime.fromtimestamp(time.time() + ttl, UTC)),
                "content_type": "audio/mpeg",
            },
            headers={"Cache-Control": "no-store"},
        )

    async def audio_stream(self, request: web.Request) -> web.StreamResponse:
        row = await self._row(request)
        url = await self.s.presigner.url(row)
        try:
            return await audio.proxy(request, self.s.http, url, self.s.metrics.audio_bytes)
        except audio.ObjectMissing:
            raise ApiError(
                502,
                "object_missing",
                f"recording {row.id}'s object is not in bucket {row.s3_bucket} "
                "(`fileserver reconcile` restores or reports it)",
            ) from None

    async def talk_groups(self, request: web.Request) -> web.Response:
        groups = await self.s.reads.talk_groups()
        return web.json_response(
            {"items": [{"grp_id": g, "newest": _iso(newest)} for g, newest in groups]}
        )

    async def openapi_doc(self, request: web.Request) -> web.Response:
        return web.json_response(openapi.document())

    async def review(self, request: web.Request) -> web.Response:
        return web.Response(
            text=page.HTML,
            content_type="text/html",
            headers={
                "Cache-Control": "no-cache",
                "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": page.CSP,
            },
        )

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/review")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        checks = await self.s.readiness.dependencies()
        problems = [f"{name}: {result}" for name, result in checks.items() if result != "ok"]
        body = {"ready": not problems, "reason": "; ".join(problems) or None, "checks": checks}
        return web.Response(
            text=json.dumps(body) + "\n",
            status=503 if problems else 200,
            content_type="application/json",
        )

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.s.metrics.render()
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp


#: (path, handler name, scope or None for an open route); every route is GET (and HEAD).
ROUTES: tuple[tuple[str, str, str | None], ...] = (
    ("/v1/recordings", "list_recordings", "read"),
    ("/v1/recordings/{id}", "get_recording", "read"),
    ("/v1/recordings/{id}/audio/url", "audio_url", "listen"),
    ("/v1/recordings/{id}/audio", "audio_stream", "listen"),
    ("/v1/talkgroups", "talk_groups", "read"),
    ("/openapi.json", "openapi_doc", None),
    ("/review", "review", None),
    ("/", "root", None),
    ("/healthz", "healthz", None),
    ("/readyz", "readyz", None),
    ("/metrics", "metrics", None),
)


def create_app(services: Services) -> web.Application:
    api = Api(services)
    scopes: dict[str, str | None] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        grant_id = "-"
        status = 500
        try:
            scope = scopes.get(name)
            if scope is not None:
                verdict = services.tokens.authorize(request.headers.get("Authorization"), scope)
                if isinstance(verdict, Denied):
                    raise ApiError(verdict.status, verdict.error, verdict.detail)
                grant_id = verdict.id
                request[GRANT] = verdict
            resp = await handler(request)
            status = resp.status
            return resp
        except ApiError as exc:
            status = exc.status
            return error_response(exc.status, exc.error, exc.detail)
        except DependencyUnavailable as exc:
            status = 503
            resp = error_response(503, "unavailable", f"{exc.dependency}: {exc.detail}")
            resp.headers["Retry-After"] = "5"
            return resp
        except web.HTTPException as exc:
            status = exc.status
            if status < 400:
                raise
            return error_response(status, "not_found" if status == 404 else "http", exc.reason)
        finally:
            elapsed = time.monotonic() - started
            services.metrics.requests.labels(name, str(status)).inc()
            services.metrics.seconds.labels(name).observe(elapsed)
            if name not in ("/healthz", "/readyz", "/metrics") or status >= 400:
                log.info(
                    "%s %s %s %.1fms token=%s remote=%s",
                    request.method,
                    _loggable(request),
                    status,
                    elapsed * 1000,
                    grant_id,
                    request.remote,
                )

    app = web.Application(middlewares=[middleware])
    for path, handler_name, scope in ROUTES:
        resource = app.router.add_resource(path)
        resource.add_route("GET", getattr(api, handler_name))
        resource.add_route("HEAD", getattr(api, handler_name))
        scopes[resource.canonical] = scope
    return app
