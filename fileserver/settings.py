"""Settings, read from ``FILESERVER_*`` environment variables by :meth:`Settings.from_env`.

Nothing here reads the environment at import time; the CLI calls ``from_env`` once.
S3 credentials come from boto3's own chain (``AWS_ACCESS_KEY_ID``, profiles, roles).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fileserver.errors import ConfigError
from fileserver.settings_docs import DOCS

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


# Kafka's rule for topic names, which group.instance.id shares (JoinGroupRequest).
_KAFKA_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._-]{1,249}")
LOG_FORMATS = ("AUTO", "JSON", "TEXT")  # upper case, as _choice compares
KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SECRET_FIELDS = frozenset({"kafka_sasl_password", "kafka_ssl_key_password"})


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _str(env, name, default).upper()
    if raw not in choices:
        raise ConfigError(f"{PREFIX}{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _verify(env: Mapping[str, str], name: str) -> bool | str:
    """``true`` (default), ``false``, or the path of a CA bundle."""
    raw = _str(env, name, "")
    if raw.lower() in ("", "1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    return raw


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
    """Every knob of the worker and the commands; see the settings table in docs/operations.md."""

    kafka_bootstrap: str = "localhost:9092"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = field(default=None, repr=False)
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_ssl_key_password: str | None = field(default=None, repr=False)
    topic: str = "janus-events"
    group_id: str = "fileserver"
    # Static group membership (KIP-345): a stable name per worker (a StatefulSet pod's
    # name). A restarted worker with the same id takes its partitions back at once instead
    # of waiting out its dead predecessor's session. Unset: dynamic membership.
    group_instance_id: str | None = None
    dlq_topic: str = "fileserver-dlq"
    database_url: str = field(
        default="postgresql+psycopg://fileserver@localhost:5432/fileserver", repr=False
    )
    s3_endpoint_url: str | None = None
    s3_bucket: str = "ptt-recordings"
    s3_region: str | None = None
    s3_verify: bool | str = True
    allowed_sources: tuple[str, ...] = ()
    max_file_bytes: int = 64 * 1024 * 1024
    max_duration_s: int = 600
    source_retry_s: float = 300.0
    # A 404/410 this close to the event's own time (ptt_msg.timestamp) is retried like
    # a 503: gateways publish the event a moment before their HTTP server serves the
    # file. 30 s covers that moment many times over (it is a flush and a rename, well
    # under a second) and a few seconds of clock skew between gateway and worker, while a
    # file truly missing is dead-lettered no more than 30 s late. 0 turns it off.
    not_found_grace_s: float = 30.0
    # Speech analysis of each burst (fileserver.analysis). Off: the columns stay NULL.
    analysis_enabled: bool = True
    # Larger files are not analysed (logged; columns NULL): 4 MiB is 20+ minutes of
    # Janus' 24 kbit/s, far over any talk burst; decoding is in 3 s blocks anyway.
    analysis_max_bytes: int = 4 * 1024 * 1024
    # Child processes running the analysis (fileserver.analyzer), out of the worker's GIL
    # (bench/README.md). Each has up to 64 bursts queued; one is enough for a worker (a
    # burst is ~0.5 ms of its CPU). 0: one analysis at a time in a thread of the worker.
    analysis_processes: int = 1
    # WebRTC VAD aggressiveness 0-3; 3 rejects the most non-speech (radio hiss, clicks).
    analysis_vad_mode: int = 3
    # A frame quieter than this is no voice (speech over a radio is -35..-10 dBFS).
    analysis_speech_min_dbfs: float = -50.0
    # ... nor one less than this far above the burst's noise floor: steady hiss and tones
    # stay within ~3 dB of their floor, syllables rise 10-30 dB above it.
    analysis_speech_snr_db: float = 9.0
    # Less speech than this in a burst is an empty burst (a kerchunk): shorter than any
    # word ("no", "yes" are 250-400 ms) and longer than a key-up click.
    analysis_min_speech_ms: int = 300
    # Samples at or above this level count as clipped. The MP3 encoder turns a clipped
    # waveform's flat tops into ripple a few tenths of a dB under full scale (a clipped
    # tone decodes to a plateau at -0.5..-0.04 dBFS) and the decoder clamps overshoot to
    # full scale: -0.5 dBFS counts both; unclipped audio has only isolated peaks there.
    analysis_clip_dbfs: float = -0.5
    dlq_max_consecutive: int = 100
    dlq_breaker_cooldown_s: float = 60.0
    dlq_breaker_max_hold_s: float = 900.0
    shutdown_grace_s: float = 30.0
    concurrency: int = 192
    max_pending: int = 4096
    download_memory_bytes: int = 64 * 1024 * 1024
    max_downloads_per_source: int = 64
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    fetch_timeout_s: float = 120.0
    multipart_threshold_bytes: int = 16 * 1024 * 1024
    multipart_chunk_bytes: int = 8 * 1024 * 1024
    tmp_dir: str | None = None
    web_port: int = 6066
    web_enabled: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9108
    log_level: str = "INFO"
    log_format: str = "auto"
    commit_interval_s: float = 1.0
    db_batch_rows: int = 100
    db_batch_linger_ms: float = 10.0
    http_transport: str = "http11"
    s3_transport: str = "http11"
    s3_threads: int = 8
    session_timeout_s: float = 30.0
    kafka_fetch_min_bytes: int = 64 * 1024
    kafka_fetch_max_wait_ms: int = 20
    rebalance_timeout_s: float = 60.0
    db_statement_timeout_s: float = 30.0
    internal_error_attempts: int = 5
    # ``fileserver serve`` (fileserver/serve/): the read API and the review page
    serve_host: str = "127.0.0.1"
    serve_port: int = 8080
    serve_tokens: tuple[str, ...] = field(default=(), repr=False)
    serve_presign_ttl_s: int = 300

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from an environment mapping (``os.environ`` by default); raise
        :class:`SettingsError` listing every problem at once."""
        settings, problems = cls.read(env)
        if problems:
            raise SettingsError(problems)
        return settings

    @classmethod
    def read(cls, env: Mapping[str, str] | None = None) -> tuple[Settings, list[str]]:
        """The settings of ``env`` and every problem with them (one message each, naming
        the setting); a value that cannot be read is replaced by its default."""
        e = os.environ if env is None else env
        d = cls()
        problems: list[str] = []

        def get(parse: Callable[..., Any], name: str, *args: Any) -> Any:
            """One setting; a bad value is noted (all are reported at once) and the
            default stands in for it meanwhile."""
            try:
                return parse(e, name, *args)
            except ConfigError as exc:
                problems.append(str(exc))
                return getattr(d, name.lower())

        settings = cls(
            kafka_bootstrap=get(_str, "KAFKA_BOOTSTRAP", d.kafka_bootstrap),
            kafka_security_protocol=get(
                _choice,
                "KAFKA_SECURITY_PROTOCOL",
                d.kafka_security_protocol,
                KAFKA_SECURITY_PROTOCOLS,
            ),
            kafka_sasl_mechanism=get(
                _choice, "KAFKA_SASL_MECHANISM", d.kafka_sasl_mechanism, KAFKA_SASL_MECHANISMS
            ),
            kafka_sasl_username=get(_opt, "KAFKA_SASL_USERNAME"),
            kafka_sasl_password=e.get(PREFIX + "KAFKA_SASL_PASSWORD") or None,
            kafka_ssl_cafile=get(_opt, "KAFKA_SSL_CAFILE"),
            kafka_ssl_certfile=get(_opt, "KAFKA_SSL_CERTFILE"),
            kafka_ssl_keyfile=get(_opt, "KAFKA_SSL_KEYFILE"),
            kafka_ssl_key_password=e.get(PREFIX + "KAFKA_SSL_KEY_PASSWORD") or None,
            topic=get(_str, "TOPIC", d.topic),
            group_id=get(_str, "GROUP_ID", d.group_id),
            group_instance_id=get(_opt, "GROUP_INSTANCE_ID"),
            dlq_topic=get(_str, "DLQ_TOPIC", d.dlq_topic),
            database_url=get(_str, "DATABASE_URL", d.database_url),
            s3_endpoint_url=get(_opt, "S3_ENDPOINT_URL"),
            s3_bucket=get(_str, "S3_BUCKET", d.s3_bucket),
            s3_region=get(_opt, "S3_REGION"),
            s3_verify=get(_verify, "S3_VERIFY"),
            allowed_sources=get(_list, "ALLOWED_SOURCES"),
            max_file_bytes=get(_int, "MAX_FILE_BYTES", d.max_file_bytes, 1),
            max_duration_s=get(_int, "MAX_DURATION_S", d.max_duration_s, 1),
            source_retry_s=get(_float, "SOURCE_RETRY_S", d.source_retry_s),
            not_found_grace_s=get(_float, "NOT_FOUND_GRACE_S", d.not_found_grace_s),
            analysis_enabled=get(_bool, "ANALYSIS_ENABLED", d.analysis_enabled),
            analysis_max_bytes=get(_int, "ANALYSIS_MAX_BYTES", d.analysis_max_bytes, 0),
            analysis_processes=get(_int, "ANALYSIS_PROCESSES", d.analysis_processes, 0),
            analysis_vad_mode=get(_int, "ANALYSIS_VAD_MODE", d.analysis_vad_mode, 0),
            analysis_speech_min_dbfs=get(
                _float, "ANALYSIS_SPEECH_MIN_DBFS", d.analysis_speech_min_dbfs, -120.0
            ),
            analysis_speech_snr_db=get(_float, "ANALYSIS_SPEECH_SNR_DB", d.analysis_speech_snr_db),
            analysis_min_speech_ms=get(_int, "ANALYSIS_MIN_SPEECH_MS", d.analysis_min_speech_ms, 0),
            analysis_clip_dbfs=get(_float, "ANALYSIS_CLIP_DBFS", d.analysis_clip_dbfs, -120.0),
            dlq_max_consecutive=get(_int, "DLQ_MAX_CONSECUTIVE", d.dlq_max_consecutive, 0),
            dlq_breaker_cooldown_s=get(
                _float, "DLQ_BREAKER_COOLDOWN_S", d.dlq_breaker_cooldown_s, 0.1
            ),
            dlq_breaker_max_hold_s=get(_float, "DLQ_BREAKER_MAX_HOLD_S", d.dlq_breaker_max_hold_s),
            shutdown_grace_s=get(_float, "SHUTDOWN_GRACE_S", d.shutdown_grace_s),
            concurrency=get(_int, "CONCURRENCY", d.concurrency, 1),
            max_pending=get(_int, "MAX_PENDING", d.max_pending, 1),
            download_memory_bytes=get(_int, "DOWNLOAD_MEMORY_BYTES", d.download_memory_bytes, 0),
            max_downloads_per_source=get(
                _int, "MAX_DOWNLOADS_PER_SOURCE", d.max_downloads_per_source, 1
            ),
            connect_timeout_s=get(_float, "CONNECT_TIMEOUT_S", d.connect_timeout_s, 0.1),
            read_timeout_s=get(_float, "READ_TIMEOUT_S", d.read_timeout_s, 0.1),
            fetch_timeout_s=get(_float, "FETCH_TIMEOUT_S", d.fetch_timeout_s, 0.1),
            multipart_threshold_bytes=get(
                _int, "MULTIPART_THRESHOLD_BYTES", d.multipart_threshold_bytes, 5 * 1024 * 1024
            ),
            multipart_chunk_bytes=get(
                _int, "MULTIPART_CHUNK_BYTES", d.multipart_chunk_bytes, 5 * 1024 * 1024
            ),
            tmp_dir=get(_opt, "TMP_DIR"),
            web_port=get(_int, "WEB_PORT", d.web_port, 0),
            web_enabled=get(_bool, "WEB_ENABLED", d.web_enabled),
            metrics_host=get(_str, "METRICS_HOST", d.metrics_host),
            metrics_port=get(_int, "METRICS_PORT", d.metrics_port, 0),
            log_level=get(_level, "LOG_LEVEL", d.log_level),
            log_format=get(_choice, "LOG_FORMAT", d.log_format, LOG_FORMATS).lower(),
            commit_interval_s=get(_float, "COMMIT_INTERVAL_S", d.commit_interval_s, 0.05),
            db_batch_rows=get(_int, "DB_BATCH_ROWS", d.db_batch_rows, 1),
            db_batch_linger_ms=get(_float, "DB_BATCH_LINGER_MS", d.db_batch_linger_ms, 0.0),
            http_transport=get(_str, "HTTP_TRANSPORT", d.http_transport).lower(),
            s3_transport=get(_str, "S3_TRANSPORT", d.s3_transport).lower(),
            s3_threads=get(_int, "S3_THREADS", d.s3_threads, 1),
            session_timeout_s=get(_float, "SESSION_TIMEOUT_S", d.session_timeout_s, 1.0),
            kafka_fetch_min_bytes=get(_int, "KAFKA_FETCH_MIN_BYTES", d.kafka_fetch_min_bytes, 1),
            kafka_fetch_max_wait_ms=get(
                _int, "KAFKA_FETCH_MAX_WAIT_MS", d.kafka_fetch_max_wait_ms, 0
            ),
            rebalance_timeout_s=get(_float, "REBALANCE_TIMEOUT_S", d.rebalance_timeout_s, 1.0),
            db_statement_timeout_s=get(
                _float, "DB_STATEMENT_TIMEOUT_S", d.db_statement_timeout_s, 0.1
            ),
            internal_error_attempts=get(
                _int, "INTERNAL_ERROR_ATTEMPTS", d.internal_error_attempts, 1
            ),
            serve_host=get(_str, "SERVE_HOST", d.serve_host),
            serve_port=get(_int, "SERVE_PORT", d.serve_port, 0),
            serve_tokens=get(_list, "SERVE_TOKENS"),
            serve_presign_ttl_s=get(_int, "SERVE_PRESIGN_TTL_S", d.serve_presign_ttl_s, 1),
        )
        problems.extend(settings.problems())
        problems.extend(
            f"{PREFIX}{name} is no longer a setting: {instead}"
            for name, instead in REMOVED.items()
            if PREFIX + name in e
        )
        return settings, problems

    def validate(self) -> None:
        """Reject combinations that cannot work, naming the setting to fix (every
        problem at once: :class:`SettingsError`)."""
        problems = self.problems()
        if problems:
            raise SettingsError(problems)

    def problems(self) -> list[str]:
        """What is wrong with these settings, one message per problem, each naming the
        setting to fix (empty: nothing)."""
        out: list[str] = []
        if not self.database_url.startswith("postgresql"):
            out.append(
                f"{PREFIX}DATABASE_URL must be a postgresql+psycopg:// URL, "
                f"got {redact_url(self.database_url)!r}"
            )
        if self.group_instance_id is not None and not _KAFKA_NAME.fullmatch(self.group_instance_id):
            out.append(
                f"{PREFIX}GROUP_INSTANCE_ID={self.group_instance_id!r}: Kafka accepts 1-249 "
                "of the characters a-z A-Z 0-9 . _ - (and neither '.' nor '..')"
            )
        if self.max_pending < self.concurrency:
            out.append(f"{PREFIX}MAX_PENDING must be >= {PREFIX}CONCURRENCY")
        if self.analysis_vad_mode > 3:
            out.append(f"{PREFIX}ANALYSIS_VAD_MODE must be 0, 1, 2 or 3")
        if self.analysis_speech_min_dbfs > 0 or self.analysis_clip_dbfs > 0:
            out.append(
                f"{PREFIX}ANALYSIS_SPEECH_MIN_DBFS and {PREFIX}ANALYSIS_CLIP_DBFS are levels "
                "in dBFS: at most 0"
            )
        if self.multipart_chunk_bytes > self.multipart_threshold_bytes:
            out.append(
                f"{PREFIX}MULTIPART_CHUNK_BYTES must be <= {PREFIX}MULTIPART_THRESHOLD_BYTES"
            )
        if self.http_transport not in ("aiohttp", "http11", "httpx"):
            out.append(f"{PREFIX}HTTP_TRANSPORT must be http11 (the default), aiohttp or httpx")
        if self.s3_transport not in ("http11", "aiohttp", "boto3"):
            out.append(f"{PREFIX}S3_TRANSPORT must be http11 (the default), aiohttp or boto3")
        if self.kafka_fetch_max_wait_ms > 10_000:
            out.append(
                f"{PREFIX}KAFKA_FETCH_MAX_WAIT_MS={self.kafka_fetch_max_wait_ms} is over "
                "10000: it is also the latency added when traffic is light"
            )
        if self.metrics_port > 65535:
            out.append(f"{PREFIX}METRICS_PORT={self.metrics_port} is not a TCP port")
        if self.serve_port > 65535:
            out.append(f"{PREFIX}SERVE_PORT={self.serve_port} is not a TCP port")
        if self.serve_presign_ttl_s > 7 * 24 * 3600:
            out.append(f"{PREFIX}SERVE_PRESIGN_TTL_S is over S3's limit of 7 days")
        out.extend(self._security_problems())
        return out

    def _security_problems(self) -> list[str]:
        """Kafka SASL/SSL and S3 TLS settings: complete, consistent, files present."""
        out: list[str] = []
        protocol = self.kafka_security_protocol
        if protocol not in KAFKA_SECURITY_PROTOCOLS:
            out.append(f"{PREFIX}KAFKA_SECURITY_PROTOCOL={protocol!r} is not supported")
        if self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
            out.append(f"{PREFIX}KAFKA_SASL_MECHANISM must be one of {KAFKA_SASL_MECHANISMS}")
        sasl = protocol.startswith("SASL_")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            out.append(
                f"{PREFIX}KAFKA_SECURITY_PROTOCOL={protocol} needs "
                f"{PREFIX}KAFKA_SASL_USERNAME and {PREFIX}KAFKA_SASL_PASSWORD"
            )
        if not sasl and (self.kafka_sasl_username or self.kafka_sasl_password):
            out.append(
                f"{PREFIX}KAFKA_SASL_USERNAME/_PASSWORD are set but "
                f"{PREFIX}KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL"
            )
        files = {
            "KAFKA_SSL_CAFILE": self.kafka_ssl_cafile,
            "KAFKA_SSL_CERTFILE": self.kafka_ssl_certfile,
            "KAFKA_SSL_KEYFILE": self.kafka_ssl_keyfile,
        }
        if not protocol.endswith("SSL") and (any(files.values()) or self.kafka_ssl_key_password):
            out.append(
                f"{PREFIX}KAFKA_SSL_* are set but {PREFIX}KAFKA_SECURITY_PROTOCOL={protocol} "
                "does not use TLS (use SSL or SASL_SSL)"
            )
        if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
            out.append(f"{PREFIX}KAFKA_SSL_KEYFILE needs {PREFIX}KAFKA_SSL_CERTFILE")
        if isinstance(self.s3_verify, str):
            files["S3_VERIFY"] = self.s3_verify
        for name, path in files.items():
            if path and not os.path.exists(path):
                out.append(f"{PREFIX}{name}={path!r}: no such file")
        return out

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict safe to log (passwords and URL passwords hidden)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                value = "***" if value else value
            elif isinstance(value, str) and "://" in value:
                value = redact_url(value)
            out[f.name] = value
        return out


class SettingsError(ConfigError):
    """One or more settings are wrong; :attr:`problems` has one message per problem."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} settings are wrong: " + "; ".join(self.problems)
        super().__init__(text)


NOT_SETTINGS = frozenset(
    {"WEED_BIN", "KAFKA_LIBS", "TOXIPROXY_BIN", "VERSITYGW_BIN", "S3PROXY_LIBS"}
)
#: Settings that were removed, refused (a configuration error, not a warning) with what
#: to set instead: an operator who set one expects it to change something.
REMOVED = {
    "ANALYSIS_THREADS": (
        "the analysis runs in child processes now; set FILESERVER_ANALYSIS_PROCESSES "
        "(default 1; 0 = one analysis at a time in a thread of the worker, the old "
        "FILESERVER_ANALYSIS_THREADS=1) and remove FILESERVER_ANALYSIS_THREADS"
    ),
}


def env_name(field_name: str) -> str:
    """A field's variable: ``concurrency`` -> ``FILESERVER_CONCURRENCY``."""
    return PREFIX + field_name.upper()


def env_names() -> dict[str, str]:
    """Every setting's variable name -> its field name."""
    return {env_name(f.name): f.name for f in fields(Settings)}


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``FILESERVER_*`` variables that are no setting (ignored, so most likely misspelt),
    each with the closest setting's name (``None`` when nothing is close)."""
    import difflib

    known = env_names()
    out: list[tuple[str, str | None]] = []
    for name in sorted(env):
        if not name.startswith(PREFIX) or name in known:
            continue
        rest = name[len(PREFIX) :]
        if rest in NOT_SETTINGS or rest in REMOVED or rest.startswith("TEST_"):
            continue
        rests = [k[len(PREFIX) :] for k in known]
        close = difflib.get_close_matches(rest, rests, n=1, cutoff=0.75)
        out.append((name, PREFIX + close[0] if close else None))
    return out


def default_text(field_name: str) -> str:
    """A setting's default as the docs and ``fileserver config`` write it."""
    doc = DOCS[field_name]
    if doc.default is not None:
        return doc.default
    return shown(Settings.__dataclass_fields__[field_name].default, field_name)


def shown(value: Any, field_name: str = "") -> str:
    """A setting's value written as the docs write it: `true`, `30`, `64 MiB`..."""
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, int) and field_name.endswith("_bytes") and value >= 1 << 20:
        return f"`{value}` ({value / (1 << 20):g} MiB)"
    if isinstance(value, tuple):
        return "`" + ",".join(str(v) for v in value) + "`"
    return f"`{value}`"
