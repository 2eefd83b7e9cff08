"""Settings, read from ``FILESERVER_*`` environment variables by :meth:`Settings.from_env`.

Nothing here reads the environment at import time; the CLI calls ``from_env`` once.
S3 credentials come from boto3's own chain (``AWS_ACCESS_KEY_ID``, profiles, roles).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fileserver.errors import ConfigError

PREFIX = "FILESERVER_"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{PREFIX}{name}={value} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{PREFIX}{name}={raw!r} must be a finite number")
    if value < minimum:
        raise ConfigError(f"{PREFIX}{name}={value} must be >= {minimum}")
    return value


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(PREFIX + name)
    return default if raw is None or raw.strip() == "" else raw.strip()


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _str(env, name, "").lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{PREFIX}{name}={raw!r} must be true or false")


def _level(env: Mapping[str, str], name: str, default: str) -> str:
    raw = _str(env, name, default).upper()
    if raw not in logging.getLevelNamesMapping():
        raise ConfigError(
            f"{PREFIX}{name}={raw!r} is not a log level (DEBUG, INFO, WARNING, ERROR)"
        )
    return raw


def _opt(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(PREFIX + name)
    return None if raw is None or raw.strip() == "" else raw.strip()


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env.get(PREFIX + name, "")
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def redact_url(url: str) -> str:
    """Hide the password of a URL such as a database DSN."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class Settings:
    """Every knob of the worker and the commands; see the README's settings table."""

    kafka_bootstrap: str = "localhost:9092"
    topic: str = "janus-events"
    group_id: str = "fileserver"
    dlq_topic: str = "fileserver-dlq"
    database_url: str = field(
        default="postgresql+psycopg://fileserver@localhost:5432/fileserver", repr=False
    )
    s3_endpoint_url: str | None = None
    s3_bucket: str = "ptt-recordings"
    s3_region: str | None = None
    allowed_sources: tuple[str, ...] = ()
    max_file_bytes: int = 64 * 1024 * 1024
    max_duration_s: int = 600
    source_retry_s: float = 300.0
    concurrency: int = 64
    max_pending: int = 4096
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    fetch_timeout_s: float = 120.0
    multipart_threshold_bytes: int = 16 * 1024 * 1024
    multipart_chunk_bytes: int = 8 * 1024 * 1024
    tmp_dir: str | None = None
    web_port: int = 6066
    web_enabled: bool = False
    log_level: str = "INFO"
    commit_interval_s: float = 1.0
    session_timeout_s: float = 30.0
    rebalance_timeout_s: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from an environment mapping (``os.environ`` by default)."""
        e = os.environ if env is None else env
        d = cls()
        settings = cls(
            kafka_bootstrap=_str(e, "KAFKA_BOOTSTRAP", d.kafka_bootstrap),
            topic=_str(e, "TOPIC", d.topic),
            group_id=_str(e, "GROUP_ID", d.group_id),
            dlq_topic=_str(e, "DLQ_TOPIC", d.dlq_topic),
            database_url=_str(e, "DATABASE_URL", d.database_url),
            s3_endpoint_url=_opt(e, "S3_ENDPOINT_URL"),
            s3_bucket=_str(e, "S3_BUCKET", d.s3_bucket),
            s3_region=_opt(e, "S3_REGION"),
            allowed_sources=_list(e, "ALLOWED_SOURCES"),
            max_file_bytes=_int(e, "MAX_FILE_BYTES", d.max_file_bytes, 1),
            max_duration_s=_int(e, "MAX_DURATION_S", d.max_duration_s, 1),
            source_retry_s=_float(e, "SOURCE_RETRY_S", d.source_retry_s),
            concurrency=_int(e, "CONCURRENCY", d.concurrency, 1),
            max_pending=_int(e, "MAX_PENDING", d.max_pending, 1),
            connect_timeout_s=_float(e, "CONNECT_TIMEOUT_S", d.connect_timeout_s, 0.1),
            read_timeout_s=_float(e, "READ_TIMEOUT_S", d.read_timeout_s, 0.1),
            fetch_timeout_s=_float(e, "FETCH_TIMEOUT_S", d.fetch_timeout_s, 0.1),
            multipart_threshold_bytes=_int(
                e, "MULTIPART_THRESHOLD_BYTES", d.multipart_threshold_bytes, 5 * 1024 * 1024
            ),
            multipart_chunk_bytes=_int(
                e, "MULTIPART_CHUNK_BYTES", d.multipart_chunk_bytes, 5 * 1024 * 1024
            ),
            tmp_dir=_opt(e, "TMP_DIR"),
            web_port=_int(e, "WEB_PORT", d.web_port, 0),
            web_enabled=_bool(e, "WEB_ENABLED", d.web_enabled),
            log_level=_level(e, "LOG_LEVEL", d.log_level),
            commit_interval_s=_float(e, "COMMIT_INTERVAL_S", d.commit_interval_s, 0.05),
            session_timeout_s=_float(e, "SESSION_TIMEOUT_S", d.session_timeout_s, 1.0),
            rebalance_timeout_s=_float(e, "REBALANCE_TIMEOUT_S", d.rebalance_timeout_s, 1.0),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Reject combinations that cannot work, naming the setting to fix."""
        if not self.database_url.startswith("postgresql"):
            raise ConfigError(
                f"{PREFIX}DATABASE_URL must be a postgresql+psycopg:// URL, "
                f"got {redact_url(self.database_url)!r}"
            )
        if self.max_pending < self.concurrency:
            raise ConfigError(f"{PREFIX}MAX_PENDING must be >= {PREFIX}CONCURRENCY")
        if self.multipart_chunk_bytes > self.multipart_threshold_bytes:
            raise ConfigError(
                f"{PREFIX}MULTIPART_CHUNK_BYTES must be <= {PREFIX}MULTIPART_THRESHOLD_BYTES"
            )

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict safe to log (passwords hidden)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = redact_url(value) if f.name == "database_url" else value
        return out
