"""Putting a recording's object back from its source: re-download, compare, re-upload.

The one repair both ``backfill --verify`` and ``reconcile --repair`` run. The source is
downloaded again through the worker's fetcher (source allowlist, size cap, deadlines);
its bytes are stored again under the row's key only if their md5 and size are the
row's, so a repair never stores anything the row does not describe. With
``reuse_matching`` the stored object is checked first (HEAD, judged by
:func:`fileserver.layout.stored_matches`) and kept when it matches.

It raises what the fetcher and the store raise (``PermanentError`` for a source that is
gone, ``RetryableError`` for one that is unavailable, ``DependencyUnavailable`` for the
store): each caller decides what a failure means for its report, and whether to retry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from fileserver.db.rows import RecordingRef
from fileserver.layout import object_metadata, stored_matches, unix_seconds
from fileserver.pipeline import Downloads
from fileserver.storage.base import StoredObject


class Store(Protocol):
    """What a repair needs of the object store (:class:`fileserver.storage.ObjectStore`)."""

    @property
    def bucket(self) -> str: ...

    async def head(self, key: str) -> StoredObject | None:
        """The object's size, ETag and metadata; ``None`` when it does not exist."""
        ...

    async def put_file(
        self, key: str, content: bytes | Path, md5_hex: str, metadata: dict[str, str]
    ) -> None:
        """Store ``content`` under ``key``, verified against ``md5_hex``."""
        ...


@dataclass(frozen=True)
class Wanted:
    """The object a row says is stored: where, what, and its metadata."""

    source_url: str
    bucket: str
    key: str
    md5: str
    size: int
    metadata: Mapping[str, str]

    @classmethod
    def of_row(cls, row: RecordingRef) -> Wanted:
        """The object of a ``recordings`` row, with the metadata the worker stores."""
        return cls(
            source_url=row.source_url,
            bucket=row.s3_bucket,
            key=row.s3_key,
            md5=row.md5,
            size=row.size_bytes,
            metadata=object_metadata(
                uid=row.uid,
                grp_id=row.grp_id,
                md5=row.md5,
                timestamp=unix_seconds(row.event_time),
            ),
        )


class Restored(StrEnum):
    """How a restore ended."""

    #: stored again from the source
    UPLOADED = "uploaded"
    #: (``reuse_matching``) the stored object matched: nothing uploaded
    ALREADY_STORED = "already_stored"
    #: the source now serves other bytes than the row says: nothing changed
    SOURCE_CHANGED = "source_changed"
    #: the row points elsewhere than the store's bucket or the expected key: nothing changed
    ELSEWHERE = "elsewhere"


@dataclass(frozen=True)
class Restore:
    """What :func:`restore_object` did, with what it saw."""

    outcome: Restored
    #: the md5 and size of what the source serves now
    source_md5: str
    source_size: int
    #: (``reuse_matching``) what the store held before
    previous: StoredObject | None = None


async def restore_object(
    wanted: Wanted,
    fetcher: Downloads,
    store: Store,
    *,
    expected_key: str | None = None,
    reuse_matching: bool = False,
) -> Restore:
    """Download ``wanted.source_url`` again and store it under ``wanted.key`` if it is
    the row's bytes (md5 and size), in the row's bucket (the store's) and, given
    ``expected_key``, under that key; with ``reuse_matching``, keep a stored object that
    matches instead of uploading it again."""
    async with fetcher.download(wanted.source_url) as download:
        md5, size = download.md5, download.size
        if md5 != wanted.md5 or size != wanted.size:
            return Restore(Restored.SOURCE_CHANGED, md5, size)
        if wanted.bucket != store.bucket or expected_key not in (None, wanted.key):
            return Restore(Restored.ELSEWHERE, md5, size)
        previous = None
        if reuse_matching:
            previous = await store.head(wanted.key)
            if stored_matches(previous, size=wanted.size, md5=wanted.md5):
                return Restore(Restored.ALREADY_STORED, md5, size, previous)
        await store.put_file(wanted.key, download.content, wanted.md5, dict(wanted.metadata))
    return Restore(Restored.UPLOADED, md5, size, previous)
