"""The one repair (re-download, compare, re-upload) with an in-memory source and store."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fileserver.errors import DependencyUnavailable, PermanentError, Reason
from fileserver.fetch import Download
from fileserver.repair import Restored, Wanted, restore_object
from fileserver.repository import RecordingRef
from fileserver.storage import StoredObject

DATA = b"the recording's bytes"
MD5 = hashlib.md5(DATA).hexdigest()
ROW = RecordingRef(
    id=7,
    source_url="http://src/a.mp3",
    md5=MD5,
    size_bytes=len(DATA),
    uid=14,
    grp_id=1,
    event_time=datetime(2019, 9, 27, 7, 34, 57, tzinfo=UTC),
    s3_bucket="bucket",
    s3_key="1/14/2019/09/27/1569569697-x.mp3",
)
WANTED = Wanted.of_row(ROW)


class Source:
    def __init__(self, data: bytes | None = DATA) -> None:
        self.data = data
        self.downloads = 0

    @contextlib.asynccontextmanager
    async def download(self, url: str) -> AsyncIterator[Download]:
        self.downloads += 1
        if self.data is None:
            raise PermanentError(Reason.SOURCE_NOT_FOUND, f"{url}: 404")
        md5 = hashlib.md5(self.data).hexdigest()
        yield Download(path=None, data=self.data, size=len(self.data), md5=md5, url=url)


class Store:
    def __init__(self, stored: StoredObject | None = None, *, down: bool = False) -> None:
        self.bucket = "bucket"
        self.stored = stored
        self.down = down
        self.puts: list[tuple[str, bytes | Path, str, dict[str, str]]] = []
        self.heads = 0

    async def head(self, key: str) -> StoredObject | None:
        self.heads += 1
        return self.stored

    async def put_file(
        self, key: str, content: bytes | Path, md5_hex: str, metadata: dict[str, str]
    ) -> None:
        if self.down:
            raise DependencyUnavailable("s3", "connection refused")
        self.puts.append((key, content, md5_hex, metadata))


def test_a_rows_object_carries_the_workers_metadata() -> None:
    assert (WANTED.source_url, WANTED.bucket, WANTED.key) == (ROW.source_url, "bucket", ROW.s3_key)
    assert (WANTED.md5, WANTED.size) == (MD5, len(DATA))
    assert WANTED.metadata == {
        "uid": "14",
        "grp-id": "1",
        "md5": MD5,
        "event-time": "1569569697",
    }


async def test_uploads_the_sources_bytes_when_they_are_the_rows() -> None:
    store = Store()
    done = await restore_object(WANTED, Source(), store)
    assert (done.outcome, done.source_md5, done.source_size) == (
        Restored.UPLOADED,
        MD5,
        len(DATA),
    )
    assert store.puts == [(ROW.s3_key, DATA, MD5, dict(WANTED.metadata))]
    assert store.heads == 0  # not asked to look first


async def test_source_serving_other_bytes_changes_nothing() -> None:
    store = Store()
    done = await restore_object(WANTED, Source(b"other bytes"), store)
    assert done.outcome is Restored.SOURCE_CHANGED
    assert (done.source_md5, done.source_size) == (hashlib.md5(b"other bytes").hexdigest(), 11)
    assert store.puts == []


async def test_a_row_pointing_elsewhere_changes_nothing() -> None:
    store = Store()
    done = await restore_object(WANTED, Source(), store, expected_key="another/key.mp3")
    assert done.outcome is Restored.ELSEWHERE and store.puts == []
    store.bucket = "another-bucket"
    done = await restore_object(WANTED, Source(), store)
    assert done.outcome is Restored.ELSEWHERE and store.puts == []
    store.bucket = "bucket"
    done = await restore_object(WANTED, Source(), store, expected_key=ROW.s3_key)
    assert done.outcome is Restored.UPLOADED


@pytest.mark.parametrize(
    ("stored", "outcome"),
    [
        (StoredObject(ROW.s3_key, len(DATA), {"md5": MD5}), Restored.ALREADY_STORED),
        (StoredObject(ROW.s3_key, len(DATA), {}, etag=MD5), Restored.ALREADY_STORED),
        (None, Restored.UPLOADED),
        (StoredObject(ROW.s3_key, 3, {"md5": MD5}), Restored.UPLOADED),
        (StoredObject(ROW.s3_key, len(DATA), {"md5": "f" * 32}), Restored.UPLOADED),
        # no md5 metadata and an ETag that is not the md5: unknown, so stored again
        (StoredObject(ROW.s3_key, len(DATA), {}, etag="abc-2"), Restored.UPLOADED),
    ],
)
async def test_reuse_matching_keeps_only_an_object_that_matches(
    stored: StoredObject | None, outcome: Restored
) -> None:
    store = Store(stored)
    done = await restore_object(WANTED, Source(), store, reuse_matching=True)
    assert (done.outcome, done.previous, store.heads) == (outcome, stored, 1)
    assert len(store.puts) == (outcome is Restored.UPLOADED)


async def test_failures_are_the_callers_to_judge() -> None:
    with pytest.raises(PermanentError, match="404"):
        await restore_object(WANTED, Source(None), Store())
    with pytest.raises(DependencyUnavailable, match="connection refused"):
        await restore_object(WANTED, Source(), Store(down=True))
