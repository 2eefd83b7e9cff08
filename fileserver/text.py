"""Text that Postgres ``TEXT`` columns and Kafka headers can always carry. No I/O.

Postgres (UTF8 database) refuses exactly two things in a ``TEXT`` value: the NUL
character (``invalid byte sequence for encoding "UTF8": 0x00``) and anything that is not
UTF-8, which from Python means a lone UTF-16 surrogate (``json.loads('"\\ud800"')``
produces one; ``str.encode("utf-8")`` then raises). One such value in an INSERT fails
the same way on every retry, so text that came from a record goes through
:func:`storable_text` before it is written; the record's original bytes are kept
elsewhere (the failure row's ``payload``), so nothing is lost by the replacement.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
"""What NUL and lone surrogates become: U+FFFD, the Unicode replacement character."""

ELLIPSIS = "\u2026"
"""The mark at the end of text cut to a limit (one character, three UTF-8 bytes)."""

_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def is_storable(text: str) -> bool:
    """Whether Postgres ``TEXT`` accepts ``text`` as is (no NUL, no surrogate)."""
    return _UNSTORABLE.search(text) is None


def storable_text(text: str, max_chars: int | None = None) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD, at most ``max_chars`` long.

    A surrogate *pair* (two code points, as ``surrogatepass`` decoding leaves them) is
    joined into the character it encodes rather than replaced: it was valid UTF-16.
    Text longer than ``max_chars`` keeps its first ``max_chars - 1`` characters and ends
    with ``…`` so a reader sees it was cut. The result always encodes as UTF-8, and the
    function is idempotent: ``storable_text(storable_text(t, n), n) == storable_text(t, n)``.
    """
    if max_chars is not None:
        if max_chars < 0:
            raise ValueError(f"max_chars must be >= 0, got {max_chars}")
        # Bounded work on huge input: joining pairs at most halves the length, so the
        # first 2 * max_chars + 2 code points decide the result.
        text = text[: 2 * max_chars + 2]
    if _UNSTORABLE.search(text) is not None:
        if _SURROGATE.search(text) is not None:
            # UTF-16 round trip: valid pairs become their character, lone ones U+FFFD.
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        text = text.replace("\x00", REPLACEMENT)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + ELLIPSIS if max_chars else ""
    return text


def storable_utf8(text: str, max_bytes: int | None = None) -> bytes:
    """:func:`storable_text` as UTF-8, cut on a character boundary to at most ``max_bytes``.

    For byte-limited places such as Kafka header values: a cut never splits a
    multi-byte character (the bytes always decode), and ends with ``…`` when there is
    room for it.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    # a character is at most 4 bytes: no need to clean more than max_bytes characters + 1
    data = storable_text(text, None if max_bytes is None else max_bytes + 1).encode("utf-8")
    if max_bytes is None or len(data) <= max_bytes:
        return data
    mark = ELLIPSIS.encode("utf-8")
    if max_bytes < len(mark):
        mark = b""
    return utf8_prefix(data, max_bytes - len(mark)) + mark


def utf8_prefix(data: bytes, max_bytes: int) -> bytes:
    """The longest prefix of UTF-8 ``data`` of at most ``max_bytes`` that ends on a
    character boundary (continuation bytes ``10xxxxxx`` are never the first byte cut)."""
    if len(data) <= max_bytes:
        return data
    end = max(max_bytes, 0)
    while end > 0 and data[end] & 0xC0 == 0x80:
        end -= 1
    return data[:end]
