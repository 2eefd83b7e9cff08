"""Parsing of the Janus records (see ``shared/docs/message-contract.md``). No I/O.

Tolerant where the meaning is clear (ids as decimal strings, ``md5`` absent or the
placeholder ``"md5"``, ``m_type`` absent), strict otherwise: every rejection is a
:class:`~fileserver.errors.PermanentError` whose detail says what was wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fileserver.errors import PermanentError, Reason

TALK = 1
SKIPPED_TYPES = {2: "signal", 3: "quality"}

BIGINT_MAX = 2**63 - 1
MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z
MAX_URL_LENGTH = 2048
MAX_M_TYPE_LENGTH = 32
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_DECIMAL = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True)
class TalkEvent:
    """A validated msg_type 1 record: one talk burst to ingest."""

    uid: int
    grp_id: int
    m_type: str
    file_path: str
    timestamp: int
    sender_md5: str | None
    source_ip: str | None

    @property
    def event_time(self) -> datetime:
        """The talk burst's time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.timestamp, tz=UTC)


@dataclass(frozen=True)
class SkippedEvent:
    """A record of another kind (msg_type 2 or 3) that fileserver counts and skips."""

    msg_type: int

    @property
    def kind(self) -> str:
        return SKIPPED_TYPES[self.msg_type]


def _invalid(detail: str) -> PermanentError:
    return PermanentError(Reason.INVALID_EVENT, detail)


def _integer(value: Any, name: str, *, maximum: int = BIGINT_MAX) -> int:
    """An int, or a decimal string of one; never a bool, float or signed string."""
    if isinstance(value, bool):
        raise _invalid(f"{name} must be an integer or a decimal string, got a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if not _DECIMAL.fullmatch(text):
            raise _invalid(f"{name} must be an integer or a decimal string, got {value[:40]!r}")
        number = int(text)
    elif value is None:
        raise _invalid(f"{name} is missing")
    else:
        raise _invalid(f"{name} must be an integer or a decimal string, got {type(value).__name__}")
    if not 0 <= number <= maximum:
        raise _invalid(f"{name}={number} is out of range 0..{maximum}")
    return number


def parse_json(value: bytes | str | None) -> Any:
    """Decode a record value as UTF-8 JSON, or raise ``malformed_json``."""
    if value is None:
        raise PermanentError(Reason.MALFORMED_JSON, "record has no value (tombstone)")
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        return json.loads(text)
    except UnicodeDecodeError as exc:
        raise PermanentError(Reason.MALFORMED_JSON, f"value is not UTF-8: {exc.reason}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers
        raise PermanentError(Reason.MALFORMED_JSON, f"value is not JSON: {exc}") from None


def parse_event(value: bytes | str | None) -> TalkEvent | SkippedEvent:
    """Parse one Kafka record value into a :class:`TalkEvent` or a :class:`SkippedEvent`."""
    doc = parse_json(value)
    if not isinstance(doc, dict):
        raise _invalid(f"value must be a JSON object, got {type(doc).__name__}")
    if "msg_type" not in doc:
        raise _invalid("msg_type is missing")
    msg_type = _integer(doc["msg_type"], "msg_type", maximum=2**31)
    if msg_type in SKIPPED_TYPES:
        return SkippedEvent(msg_type)
    if msg_type != TALK:
        raise _invalid(f"unknown msg_type {msg_type} (expected 1, 2 or 3)")
    return _talk_event(doc)


def _talk_event(doc: dict[str, Any]) -> TalkEvent:
    ptt = doc.get("ptt_msg")
    if not isinstance(ptt, dict):
        raise _invalid("msg_type 1 needs a ptt_msg object")

    m_type = ptt.get("m_type")
    if m_type is None:
        m_type = "ptt"
    elif not isinstance(m_type, str) or not 0 < len(m_type) <= MAX_M_TYPE_LENGTH:
        raise _invalid(f"ptt_msg.m_type must be a string of 1..{MAX_M_TYPE_LENGTH} characters")

    file_path = ptt.get("file_path")
    if not isinstance(file_path, str) or not file_path.strip():
        raise _invalid("ptt_msg.file_path must be a non-empty string")
    file_path = file_path.strip()
    if len(file_path) > MAX_URL_LENGTH:
        raise _invalid(f"ptt_msg.file_path is longer than {MAX_URL_LENGTH} characters")

    md5 = ptt.get("md5")
    sender_md5 = md5.lower() if isinstance(md5, str) and _HEX32.fullmatch(md5) else None

    ip = doc.get("ip")
    source_ip = ip if isinstance(ip, str) and 0 < len(ip) <= 64 else None

    return TalkEvent(
        uid=_integer(ptt.get("uid"), "ptt_msg.uid"),
        grp_id=_integer(ptt.get("grp_id"), "ptt_msg.grp_id"),
        m_type=m_type,
        file_path=file_path,
        timestamp=_integer(ptt.get("timestamp"), "ptt_msg.timestamp", maximum=MAX_TIMESTAMP),
        sender_md5=sender_md5,
        source_ip=source_ip,
    )


def object_key(event: TalkEvent, md5: str) -> str:
    """The deterministic S3 key of a recording, built only from validated fields.

    Layout: ``<grp_id>/<uid>/<YYYY>/<MM>/<DD>/<unix seconds>-<md5>.mp3`` (UTC date).
    """
    if not _HEX32.fullmatch(md5):
        raise ValueError(f"md5 must be 32 hex digits, got {md5!r}")
    t = event.event_time
    return (
        f"{event.grp_id}/{event.uid}/{t.year:04d}/{t.month:02d}/{t.day:02d}/"
        f"{event.timestamp}-{md5.lower()}.mp3"
    )
