"""The OpenAPI 3.1 document of ``fileserver serve``, written by hand (aiohttp has no
generator; a test checks that it names every route of the application and no other)."""

from __future__ import annotations

from typing import Any

from fileserver import __version__


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
AUTH_ERRORS = {
    "401": _error("no token (missing_token) or an unknown one (invalid_token)"),
    "403": _error("the token lacks this endpoint's scope (insufficient_scope)"),
    "503": _error("the database or the object store does not answer (retry)"),
}


def _secured(scope: str, op: dict[str, Any]) -> dict[str, Any]:
    op["security"] = [{"bearer": [scope]}]
    op["responses"] = {**op["responses"], **AUTH_ERRORS}
    return op


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _open(summary: str, content_type: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": [],
            "responses": {"200": {"description": "OK", "content": {content_type: {}}}},
        }
    }


def document() -> dict[str, Any]:
    recording = {
        "type": "object",
        "required": ["id", "uid", "grp_id", "event_time", "duration_ms", "empty"],
        "properties": {
            "id": {"type": "integer"},
            "uid": {"type": "integer", "description": "the radio (user) that talked"},
            "grp_id": {"type": "integer", "description": "the talk group"},
            "event_time": {"type": "string", "format": "date-time"},
            "duration_ms": {"type": "integer"},
            "size_bytes": {"type": "integer"},
            "md5": {"type": "string"},
            "m_type": {"type": "string"},
            "bitrate": {"type": "integer"},
            "sample_rate": {"type": "integer"},
            "channels": {"type": "integer"},
            "source_ip": {"type": ["string", "null"]},
            "s3_bucket": {"type": "string"},
            "s3_key": {"type": "string"},
            "ingested_at": {"type": "string", "format": "date-time"},
            "empty": {
                "type": ["boolean", "null"],
                "description": "no speech in the burst; null until the burst is analysed",
            },
            "analysis": {"type": "object", "description": "the speech analysis' other columns"},
            "links": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    paths: dict[str, Any] = {
        "/v1/recordings": {
            "get": _secured(
                "read",
                {
                    "summary": "List recordings, newest first (keyset pagination)",
                    "parameters": [
                        _query("grp_id", {"type": "integer"}, "only this talk group"),
                        _query("uid", {"type": "integer"}, "only this radio"),
                        _query(
                            "since",
                            {"type": "string", "format": "date-time"},
                            "event_time at or after (ISO 8601; UTC if no offset)",
                        ),
                        _query(
                            "until",
                            {"type": "string", "format": "date-time"},
                            "event_time before (exclusive)",
                        ),
                        _query("empty", {"type": "boolean"}, "only empty (true) or not (false)"),
                        _query(
                            "limit",
                            {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                            "page size",
                        ),
                        _query(
                            "cursor",
                            {"type": "string"},
                            "next_cursor of the previous page, unchanged (opaque)",
                        ),
                    ],
                    "responses": {
                        "200": _json("Page", "a page of recordings"),
                        "400": _error("a bad parameter or cursor"),
                    },
                },
            )
        },
        "/v1/recordings/{id}": {
            "get": _secured(
                "read",
                {
                    "summary": "One recording's metadata",
                    "parameters": [ID_PARAM],
                    "responses": {
                        "200": _json("Recording", "the recording"),
                        "404": _error("no such recording"),
                    },
                },
            )
        },
        "/v1/recordings/{id}/audio/url": {
            "get": _secured(
                "listen",
                {
                    "summary": "A short-lived presigned S3 URL of the audio",
                    "parameters": [
                        ID_PARAM,
                        _query("redirect", {"type": "boolean"}, "answer 307 to the URL instead"),
                    ],
                    "responses": {
                        "200": _json("AudioUrl", "the URL and when it expires"),
                        "307": {"description": "redirect to the presigned URL"},
                        "404": _error("no such recording"),
                    },
                },
            )
        },
        "/v1/recordings/{id}/audio": {
            "get": _secured(
                "listen",
                {
                    "summary": "The audio streamed through this server (HTTP Range supported)",
                    "parameters": [
                        ID_PARAM,
                        {
                            "name": "Range",
                            "in": "header",
                            "schema": {"type": "string"},
                            "description": "one range: bytes=a-b, bytes=a- or bytes=-n",
                        },
                    ],
                    "responses": {
                        "200": {"description": "the whole file", "content": {"audio/mpeg": {}}},
                        "206": {"description": "the range", "content": {"audio/mpeg": {}}},
                        "404": _error("no such recording"),
                        "416": {"description": "the range is outside the file"},
                        "502": _error("the recording's object is missing from the bucket"),
                    },
                },
            )
        },
        "/v1/talkgroups": {
            "get": _secured(
                "read",
                {
                    "summary": "The talk groups that have recordings",
                    "responses": {"200": _json("TalkGroups", "the talk groups")},
                },
            )
        },
        "/openapi.json": _open("This document", "application/json"),
        "/review": _open("The review page", "text/html"),
        "/": {
            "get": {
                "summary": "Redirect to /review",
                "security": [],
                "responses": {"302": {"description": "to /review"}},
            }
        },
        "/healthz": _open("Liveness", "application/json"),
        "/readyz": {
            "get": {
                "summary": "Readiness: the database and the bucket answer",
                "security": [],
                "responses": {
                    "200": {"description": "ready", "content": {"application/json": {}}},
                    "503": {"description": "not ready", "content": {"application/json": {}}},
                },
            }
        },
        "/metrics": _open("Prometheus metrics", "text/plain"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fileserver recordings API",
            "version": __version__,
            "description": "Read access to the push-to-talk recordings fileserver stored.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "tokens configured as SHA-256 hashes in "
                    "FILESERVER_SERVE_TOKENS; scopes read and listen",
                }
            },
            "schemas": {
                "Recording": recording,
                "Page": {
                    "type": "object",
                    "required": ["items", "next_cursor"],
                    "properties": {
                        "items": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Recording"},
                        },
                        "next_cursor": {"type": ["string", "null"]},
                    },
                },
                "AudioUrl": {
                    "type": "object",
                    "properties": {
                        "url": {"type": "string"},
                        "expires_in": {"type": "integer"},
                        "expires_at": {"type": "string", "format": "date-time"},
                        "content_type": {"type": "string"},
                    },
                },
                "TalkGroups": {
                    "type": "object",
                    "properties": {
                        "items": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "grp_id": {"type": "integer"},
                                    "newest": {"type": "string", "format": "date-time"},
                                },
                            },
                        }
                    },
                },
                "Error": {
                    "type": "object",
                    "required": ["error", "detail"],
                    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
                },
            },
        },
        "security": [{"bearer": []}],
    }
