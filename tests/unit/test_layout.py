"""The storage layout and the one "does the stored object match its row" rule (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fileserver import events
from fileserver.events import TalkEvent
from fileserver.layout import (
    Verdict,
    declared_md5,
    is_md5,
    judge,
    judge_stored,
    object_key,
    object_metadata,
    stored_matches,
    unix_seconds,
)
from fileserver.storage import StoredObject

MD5 = "0123456789abcdef0123456789abcdef"
OTHER = "f" * 32
EVENT = TalkEvent(
    uid=14,
    grp_id=1,
    m_type="ptt",
    file_path="http://h/a.mp3",
    timestamp=1569569697,
    sender_md5=None,
    source_ip=None,
)


def test_the_key_and_the_metadata_of_a_recording() -> None:
    assert object_key(EVENT, MD5.upper()) == f"1/14/2019/09/27/1569569697-{MD5}.mp3"
    assert events.object_key is object_key  # still importable from its former home
    assert object_metadata(uid=14, grp_id=1, md5=MD5, timestamp=1569569697) == {
        "uid": "14",
        "grp-id": "1",
        "md5": MD5,
        "event-time": "1569569697",
    }
    assert unix_seconds(EVENT.event_time) == EVENT.timestamp
    assert unix_seconds(datetime(2019, 9, 27, 7, 34, 57, tzinfo=UTC)) == 1569569697


def test_is_md5() -> None:
    assert is_md5(MD5) and is_md5(MD5.upper())
    assert not is_md5("md5") and not is_md5(MD5 + "0") and not is_md5("g" * 32)


def test_declared_md5_is_lower_case_or_none() -> None:
    assert declared_md5({"md5": MD5.upper()}) == MD5
    assert declared_md5({"uid": "1"}) is None
    assert declared_md5({"md5": ""}) is None


@pytest.mark.parametrize(
    ("stored_size", "etag", "metadata", "verdict"),
    [
        (10, "", {"md5": MD5}, Verdict.MATCH),
        (10, "", {"md5": MD5.upper()}, Verdict.MATCH),
        (10, MD5, None, Verdict.MATCH),  # a single PUT's ETag is the md5
        (10, MD5, {}, Verdict.MATCH),
        (10, MD5, {"md5": OTHER}, Verdict.MATCH),  # the bytes' own md5 wins
        (10, "", {"md5": OTHER}, Verdict.MD5_DIFFERS),
        (10, OTHER, {"md5": OTHER}, Verdict.MD5_DIFFERS),
        # No evidence of the md5: unknown, never a match.
        (10, "", {}, Verdict.MD5_UNKNOWN),
        (10, "", None, Verdict.MD5_UNKNOWN),
        (10, OTHER, {"uid": "14"}, Verdict.MD5_UNKNOWN),  # e.g. an SSE-KMS ETag
        (10, "abc-2", {}, Verdict.MD5_UNKNOWN),  # a multipart ETag
        (9, MD5, {"md5": MD5}, Verdict.SIZE_DIFFERS),
    ],
)
def test_the_rule(
    stored_size: int, etag: str, metadata: dict[str, str] | None, verdict: Verdict
) -> None:
    for md5 in (MD5, MD5.upper()):
        got = judge(size=10, md5=md5, stored_size=stored_size, etag=etag, metadata=metadata)
        assert got is verdict
    if metadata is not None:
        stored = StoredObject("k", stored_size, metadata, etag)
        assert judge_stored(stored, size=10, md5=MD5) is verdict
        assert stored_matches(stored, size=10, md5=MD5) is (verdict is Verdict.MATCH)


def test_an_object_without_md5_metadata_is_never_a_match() -> None:
    """``backfill --verify`` used to count it as one while ``reconcile`` reported it."""
    assert not stored_matches(StoredObject("k", 10, {}), size=10, md5=MD5)
    assert not stored_matches(StoredObject("k", 10, {"uid": "14"}), size=10, md5=MD5)
    assert judge_stored(None, size=10, md5=MD5) is Verdict.MISSING
    assert not stored_matches(None, size=10, md5=MD5)
