"""storable_text / storable_utf8 / utf8_prefix: examples and hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fileserver.text import (
    ELLIPSIS,
    REPLACEMENT,
    is_storable,
    storable_text,
    storable_utf8,
    utf8_prefix,
)

FUZZ = settings(deadline=None, database=None)

# st.text never draws surrogates: mix them (and NUL) in explicitly
any_text = st.lists(
    st.one_of(
        st.characters(),
        st.characters(categories=["Cs"]),
        st.just("\x00"),
        st.sampled_from(["\ud83d\ude00", "\U0001f600", "é", "对"]),  # a split pair, 4/2/3 bytes
    ),
    max_size=60,
).map("".join)
limits = st.one_of(st.none(), st.integers(min_value=0, max_value=70))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ""),
        ("plain ascii", "plain ascii"),
        ("a\x00b", f"a{REPLACEMENT}b"),
        ("\x00\x00", REPLACEMENT * 2),
        ("a\ud800b", f"a{REPLACEMENT}b"),  # lone high surrogate
        ("a\udc00b", f"a{REPLACEMENT}b"),  # lone low surrogate
        ("\udc00\ud800", REPLACEMENT * 2),  # a pair in the wrong order is two lone ones
        ("\ud83d\ude00", "\U0001f600"),  # a valid pair is the character it encodes
        ("x\ud83d", f"x{REPLACEMENT}"),  # a high surrogate at the end
        ("\t\n\x7f\x85", "\t\n\x7f\x85"),  # controls are storable: kept
        ("対讲 \U0001f600", "対讲 \U0001f600"),
    ],
)
def test_storable_text_examples(text: str, expected: str) -> None:
    assert storable_text(text) == expected
    assert is_storable(storable_text(text))


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("abcdef", 6, "abcdef"),
        ("abcdef", 5, f"abcd{ELLIPSIS}"),
        ("abcdef", 1, ELLIPSIS),
        ("abcdef", 0, ""),
        ("\ud83d\ude00\ud83d\ude00", 2, "\U0001f600\U0001f600"),  # pairs joined: it fits
        ("a\x00" * 10, 3, f"a{REPLACEMENT}{ELLIPSIS}"),
    ],
)
def test_storable_text_max_chars(text: str, limit: int, expected: str) -> None:
    assert storable_text(text, limit) == expected


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="max_chars"):
        storable_text("x", -1)
    with pytest.raises(ValueError, match="max_bytes"):
        storable_utf8("x", -1)


def test_huge_text_is_cut_without_cleaning_all_of_it() -> None:
    huge = "\ud800" * 5_000_000
    assert storable_text(huge, 10) == REPLACEMENT * 9 + ELLIPSIS


@settings(FUZZ, max_examples=3000)
@given(any_text, limits)
@example("\ud83d" + "\ude00" * 3, 1)
@example("a" * 10 + "\ud83d\ude00", 11)
def test_storable_text_properties(text: str, limit: int | None) -> None:
    result = storable_text(text, limit)
    encoded = result.encode("utf-8")  # valid UTF-8: never raises
    assert b"\x00" not in encoded
    assert is_storable(result)
    assert storable_text(result, limit) == result  # idempotent
    full = storable_text(text)
    if limit is None or len(full) <= limit:
        assert result == full  # nothing cut when it fits
    else:
        assert len(result) == limit
        assert result == (full[: limit - 1] + ELLIPSIS if limit else "")
    if is_storable(text) and (limit is None or len(text) <= limit):
        assert result == text  # storable text is never changed


@settings(FUZZ, max_examples=3000)
@given(any_text, st.one_of(st.none(), st.integers(min_value=0, max_value=80)))
@example("é" * 10, 5)
@example("\U0001f600" * 3, 7)
def test_storable_utf8_properties(text: str, limit: int | None) -> None:
    data = storable_utf8(text, limit)
    decoded = data.decode("utf-8")  # never cut inside a character
    assert b"\x00" not in data
    full = storable_text(text).encode("utf-8")
    if limit is None or len(full) <= limit:
        assert data == full
    else:
        assert len(data) <= limit
        body = decoded.removesuffix(ELLIPSIS) if limit >= 3 else decoded
        assert full.startswith(body.encode("utf-8"))
        assert len(data) > limit - 3 - 4  # at most one character and the mark short


def test_storable_utf8_examples() -> None:
    assert storable_utf8("é" * 10, 5) == "é".encode() + ELLIPSIS.encode()
    assert storable_utf8("abc", 2) == b"ab"
    assert storable_utf8("a\ud800", None) == f"a{REPLACEMENT}".encode()
    assert storable_utf8("x" * 2000, 1024) == b"x" * 1021 + ELLIPSIS.encode()


@pytest.mark.parametrize(
    ("data", "limit", "expected"),
    [
        (b"abc", 5, b"abc"),
        (b"abc", 2, b"ab"),
        ("aé".encode(), 2, b"a"),  # é is 2 bytes: not split
        ("a\U0001f600".encode(), 4, b"a"),
        ("a\U0001f600".encode(), 5, "a\U0001f600".encode()),
        (b"abc", 0, b""),
    ],
)
def test_utf8_prefix(data: bytes, limit: int, expected: bytes) -> None:
    assert utf8_prefix(data, limit) == expected
