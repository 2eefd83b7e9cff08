"""The storage layout, and the one rule for "does the stored object match its row". No I/O.

A recording is stored under a deterministic key (:func:`object_key`) with a few
metadata headers (:func:`object_metadata`); every command that writes an object builds
both here, and every command that checks one judges it with :func:`judge`.

The rule: a stored object matches a row when its size is the row's and the store gives
evidence that its md5 is the row's, either its ETag (which is the md5 of the bytes for a
single PUT without SSE-KMS/SSE-C) or the ``md5`` metadata the worker writes. Without
that evidence the md5 is *unknown*, and unknown is never a match: an object whose
metadata was lost (or that someone else wrote) is re-checked and re-uploaded, never
trusted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
#: The metadata header (``x-amz-meta-md5``) holding the hex md5 of the object's bytes.
MD5_METADATA = "md5"


class KeyedEvent(Protocol):
    """What the key of a recording is made of (:class:`fileserver.events.TalkEvent`)."""

    @property
    def uid(self) -> int: ...
    @property
    def grp_id(self) -> int: ...
    @property
    def timestamp(self) -> int:
        """Unix seconds of the talk burst."""
        ...


def is_md5(value: str) -> bool:
    """Whether ``value`` is an md5 in hex (32 digits, either case)."""
    return _HEX32.fullmatch(value) is not None


def object_key(event: KeyedEvent, md5: str) -> str:
    """The deterministic S3 key of a recording, built only from validated fields.

    Layout: ``<grp_id>/<uid>/<YYYY>/<MM>/<DD>/<unix seconds>-<md5>.mp3`` (UTC date).
    """
    if not is_md5(md5):
        raise ValueError(f"md5 must be 32 hex digits, got {md5!r}")
    t = datetime.fromtimestamp(event.timestamp, tz=UTC)
    return (
        f"{event.grp_id}/{event.uid}/{t.year:04d}/{t.month:02d}/{t.day:02d}/"
        f"{event.timestamp}-{md5.lower()}.mp3"
    )


def object_metadata(*, uid: int, grp_id: int, md5: str, timestamp: int) -> dict[str, str]:
    """The metadata stored with a recording's object (``x-amz-meta-*``)."""
    return {
        "uid": str(uid),
        "grp-id": str(grp_id),
        MD5_METADATA: md5,
        "event-time": str(timestamp),
    }


def unix_seconds(moment: datetime) -> int:
    """A row's ``event_time`` as the unix seconds of its event (the key's and the
    metadata's ``timestamp``)."""
    return int(moment.timestamp())


def declared_md5(metadata: Mapping[str, str]) -> str | None:
    """The md5 the object's metadata declares (lower case), ``None`` when it has none."""
    value = metadata.get(MD5_METADATA)
    return value.strip().lower() if value else None


class Verdict(StrEnum):
    """How a stored object compares with what its row says."""

    MATCH = "match"
    MISSING = "missing"
    SIZE_DIFFERS = "size_differs"
    #: the md5 metadata names another md5
    MD5_DIFFERS = "md5_differs"
    #: no evidence of the md5 (no metadata, an ETag that is not the row's md5): never a match
    MD5_UNKNOWN = "md5_unknown"


class Stored(Protocol):
    """What the store says about an object (:class:`fileserver.storage.StoredObject`)."""

    @property
    def size(self) -> int: ...
    @property
    def etag(self) -> str: ...
    @property
    def metadata(self) -> Mapping[str, str]: ...


def judge(
    *,
    size: int,
    md5: str,
    stored_size: int,
    etag: str = "",
    metadata: Mapping[str, str] | None = None,
) -> Verdict:
    """Compare an object (its size, ETag as :func:`fileserver.storage.etag_value`, and
    its metadata when read: ``None`` when not) with the row's ``size`` and ``md5``."""
    if stored_size != size:
        return Verdict.SIZE_DIFFERS
    md5 = md5.strip().lower()
    if etag and etag == md5:
        return Verdict.MATCH
    declared = None if metadata is None else declared_md5(metadata)
    if declared is None:
        return Verdict.MD5_UNKNOWN
    return Verdict.MATCH if declared == md5 else Verdict.MD5_DIFFERS


def judge_stored(stored: Stored | None, *, size: int, md5: str) -> Verdict:
    """:func:`judge` for what a HEAD returned (``None``: there is no object)."""
    if stored is None:
        return Verdict.MISSING
    return judge(
        size=size, md5=md5, stored_size=stored.size, etag=stored.etag, metadata=stored.metadata
    )


def stored_matches(stored: Stored | None, *, size: int, md5: str) -> bool:
    """Whether the object a HEAD returned is the row's bytes (see the module's rule)."""
    return judge_stored(stored, size=size, md5=md5) is Verdict.MATCH
