"""Logging set-up for the commands: readable on a terminal, one JSON object per line otherwise.

Every record is scrubbed of secrets before it is written: the password of any
``scheme://user:password@host`` URL in the message or the exception text, and the
values of the secret environment variables (:data:`SECRET_ENV_VARS`). The scrubbing
is done by :class:`SecretFilter` on fileserver's handler *and* by a log-record factory
(:func:`install_scrubbing`), so it survives libraries (faust's worker) that replace the
root handlers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

# scheme://user:password@ -> scheme://user:***@ (the password may itself contain '@')
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+._-]*://[^\s/?#:@]*):[^\s/?#]*@")
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "FILESERVER_KAFKA_SASL_PASSWORD",
    "FILESERVER_KAFKA_SSL_KEY_PASSWORD",
)
_MIN_SECRET_LENGTH = 4  # shorter values would blank out ordinary words
_secrets: set[str] = set()
_by_length: tuple[str, ...] = ()  # _secrets, longest first (kept in step by register_secrets)
_SCRUBBED = "_fileserver_scrubbed"


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL passwords and the given (and registered) secret values masked."""
    if "://" in text:
        text = _USERINFO.sub(r"\g<head>:***@", text)
    ordered = sorted({*_secrets, *secrets}, key=len, reverse=True) if secrets else _by_length
    for secret in ordered:
        if len(secret) >= _MIN_SECRET_LENGTH and secret in text:
            text = text.replace(secret, "***")
    return text


def register_secrets(values: Iterable[str | None]) -> None:
    """Mask these exact values in every later log record (passwords, keys)."""
    global _by_length
    _secrets.update(v for v in values if v and len(v) >= _MIN_SECRET_LENGTH)
    _by_length = tuple(sorted(_secrets, key=len, reverse=True))


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """Scrub a record's message, exception and stack text in place (idempotent)."""
    if getattr(record, _SCRUBBED, False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a broken %-format: let the handler report it as usual
        return record
    clean = scrub(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
    setattr(record, _SCRUBBED, True)
    return record


class SecretFilter(logging.Filter):
    """A handler/logger filter that scrubs secrets from every record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


_installed_factory: Callable[..., logging.LogRecord] | None = None


def install_scrubbing() -> None:
    """Scrub every record at creation, whichever handlers are configured later."""
    global _installed_factory
    current = logging.getLogRecordFactory()
    if current is _installed_factory:
        return
    previous = current

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return scrub_record(previous(*args, **kwargs))

    _installed_factory = factory
    logging.setLogRecordFactory(factory)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line; a record's ``extra={"fields": {...}}`` become keys.

    Never drops a record: a value JSON cannot encode (a datetime, a Path, an exception)
    is written as its ``str()``, and a message whose %-format does not match its
    arguments is written as the format and the arguments."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception as exc:  # a broken %-format: keep what there is
            message = f"{record.msg!r} % {record.args!r} ({type(exc).__name__}: {exc})"
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                doc.setdefault(str(key), scrub(value) if isinstance(value, str) else value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return dumps(doc)


def _text(value: object) -> str:
    """What a value JSON cannot encode is written as: its ``str()``, scrubbed."""
    try:
        return scrub(str(value))
    except Exception:
        return object.__repr__(value)


def dumps(doc: dict[str, Any]) -> str:
    """``doc`` as one JSON line, whatever its values (see :class:`JsonFormatter`)."""
    try:
        return json.dumps(doc, ensure_ascii=False, default=_text)
    except (TypeError, ValueError, RecursionError):  # circular, or keys json refuses
        return json.dumps(
            {
                str(k): v if isinstance(v, str | int | float | bool | None) else _text(v)
                for k, v in doc.items()
            },
            ensure_ascii=False,
        )


#: ``--log-format`` / ``FILESERVER_LOG_FORMAT``: ``auto`` is JSON unless stderr is a terminal.
LOG_FORMATS = ("auto", "json", "text")


def wants_json(log_format: str = "auto", stream: Any = None) -> bool:
    """Whether ``log_format`` means JSON lines on ``stream`` (stderr by default)."""
    if log_format == "json":
        return True
    if log_format == "text":
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def fatal(message: str, *, json_lines: bool, status: int, **fields: Any) -> None:
    """Write a command's fatal error to stderr: ``fileserver: message`` on a terminal, one
    JSON line (level ``critical``, ``exit_status``) among the JSON logs otherwise."""
    message = scrub(message)
    if not json_lines:
        print(f"fileserver: {message}", file=sys.stderr, flush=True)
        return
    record = logging.LogRecord("fileserver", logging.CRITICAL, __file__, 0, message, None, None)
    record.fields = {"exit_status": status, **fields}
    print(JsonFormatter().format(record), file=sys.stderr, flush=True)


def configure(
    level: str = "INFO", *, json_lines: bool | None = None, log_format: str = "auto"
) -> None:
    """Configure the root logger; JSON lines unless ``log_format`` is ``text``, or is
    ``auto`` and stderr is a terminal (``json_lines`` overrides ``log_format``)."""
    if json_lines is None:
        json_lines = wants_json(log_format)
    register_secrets(os.environ.get(name) for name in SECRET_ENV_VARS)
    install_scrubbing()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SecretFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in (
        "aiokafka",
        "botocore",
        "urllib3",
        "httpx",
        "httpcore",
        "faust",
        "mode",
        "alembic.runtime.plugins",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
