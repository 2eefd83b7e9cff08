"""Parsing of the Janus records (see ``docs/message-contract.md``). No I/O.

Tolerant where the meaning is clear (ids as decimal strings, ``md5`` absent or the
placeholder ``"md5"``, ``m_type`` absent), strict otherwise: every rejection is a
:class:`~fileserver.errors.PermanentError` whose detail says what was wrong. Every text
a :class:`TalkEvent` keeps is storable in Postgres ``TEXT`` (no NUL, no surrogate, no
control character): a record that would make an INSERT fail forever is rejected here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fileserver.errors import PermanentError, Reason
from fileserver.layout import object_key as object_key  # re-exported: its home is layout

TALK = 1
SKIPPED_TYPES = {2: "signal", 3: "quality"}

BIGINT_MAX = 2**63 - 1
MAX_TIMESTAMP = 253402300799  # 9999-12-31T23:59:59Z
MAX_URL_LENGTH = 2048
MAX_M_TYPE_LENGTH = 32
MAX_IP_LENGTH = 64
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_DECIMAL = re.compile(r"[0-9]{1,19}")
# Characters no kept text field may contain. C0 controls U+0000-U+001F (NUL, which
# Postgres TEXT refuses, and TAB/CR/LF, which split log lines and are never part of a
# URL, a message kind or an address), DEL U+007F, C1 controls U+0080-U+009F (NEL is a
# line break; C1 in text is mojibake from a Latin-1 decode), and UTF-16 surrogates
# U+D800-U+DFFF (json.loads turns "\ud800" into a lone one, which is not UTF-8 and
# which no driver can encode). Unicode format characters (Cf: zero-width space, bidi
# marks) are left alone: they are storable and valid in real text.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


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


def _check_text(value: str, name: str) -> None:
    """Raise ``invalid_event`` naming ``name`` if ``value`` has a ``_FORBIDDEN`` character.

    The detail shows the character escaped (``ascii()``) so the detail is itself
    storable and printable.
    """
    bad = _FORBIDDEN.search(value)
    if bad is None:
        return
    char = bad.group()
    code = ord(char)
    if code == 0:
        kind = "a NUL character"
    elif 0xD800 <= code <= 0xDFFF:
        kind = "a surrogate (not UTF-8)"
    else:
        kind = "a control character"
    raise _invalid(f"{name} contains {kind} {char!a} (U+{code:04X}) at index {bad.start()}")


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
    else:
        _check_text(m_type, "ptt_msg.m_type")

    file_path = ptt.get("file_path")
    if not isinstance(file_path, str) or not file_path.strip():
        raise _invalid("ptt_msg.file_path must be a non-empty string")
    file_path = file_path.strip()
    if len(file_path) > MAX_URL_LENGTH:
        raise _invalid(f"ptt_msg.file_path is longer than {MAX_URL_LENGTH} characters")
    _check_text(file_path, "ptt_msg.file_path")  # after the strip: edges may be spaces

    md5 = ptt.get("md5")
    sender_md5 = md5.lower() if isinstance(md5, str) and _HEX32.fullmatch(md5) else None

    # ip is provenance only: a missing, non-string, empty or over-long value is dropped;
    # but a string with control characters or surrogates is a corrupt record.
    ip = doc.get("ip")
    if isinstance(ip, str):
        _check_text(ip, "ip")
    source_ip = ip if isinstance(ip, str) and 0 < len(ip) <= MAX_IP_LENGTH else None

    return TalkEvent(
        uid=_integer(ptt.get("uid"), "ptt_msg.uid"),
        grp_id=_integer(ptt.get("grp_id"), "ptt_msg.grp_id"),
        m_type=m_type,
        file_path=file_path,
        timestamp=_integer(ptt.get("timestamp"), "ptt_msg.timestamp", maximum=MAX_TIMESTAMP),
        sender_md5=sender_md5,
        source_ip=source_ip,
    )
