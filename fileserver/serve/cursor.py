"""The opaque pagination cursor: where the last page ended, ``(event_time, id)``.

Clients pass ``next_cursor`` back as it is; its content (a version, the microseconds
since the epoch, the id, base64url) is not part of the API and may change.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta

from fileserver.db.reads import Position

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_VERSION = "1"


class BadCursor(ValueError):
    """A cursor this server did not issue."""


def encode(position: Position) -> str:
    micros = (position.event_time - _EPOCH) // _US
    raw = f"{_VERSION}:{micros}:{position.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str) -> Position:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        version, micros, row_id = base64.urlsafe_b64decode(padded).decode().split(":")
        if version != _VERSION:
            raise ValueError(version)
        position_id = int(row_id)
        if not 0 <= position_id <= 2**63 - 1:  # a BIGINT id, or no cursor of ours
            raise ValueError(row_id)
        return Position(_EPOCH + int(micros) * _US, position_id)
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError):
        raise BadCursor("not a cursor of this API: pass next_cursor back unchanged") from None
