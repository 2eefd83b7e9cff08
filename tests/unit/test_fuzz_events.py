"""Property tests of parse_event / object_key (hypothesis), > 10,000 generated cases."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from fileserver.errors import PermanentError, Reason
from fileserver.events import (
    BIGINT_MAX,
    MAX_TIMESTAMP,
    SkippedEvent,
    TalkEvent,
    object_key,
    parse_event,
)

OBJECT_KEY = re.compile(r"^\d+/\d+/\d{4}/\d{2}/\d{2}/\d+-[0-9a-f]{32}\.mp3$")
ABSENT = object()
HEX32 = st.text(alphabet="0123456789abcdefABCDEF", min_size=32, max_size=32)
# what no text a TalkEvent keeps may contain: C0, DEL, C1 and surrogates (events.py)
UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# one such character (hypothesis' Cc is exactly C0 + DEL + C1)
bad_char = st.characters(categories=["Cc", "Cs"])
# text without them, and text of any code point at all (st.text never draws surrogates)
clean_text = st.text(st.characters(exclude_categories=["Cc", "Cs"]), max_size=12)
any_text = st.lists(st.one_of(st.characters(), bad_char), max_size=40).map("".join)

FUZZ = settings(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check(value: bytes | str | None) -> TalkEvent | SkippedEvent | None:
    """parse_event either returns an event or raises a well-formed PermanentError."""
    try:
        parsed = parse_event(value)
    except PermanentError as exc:
        event(f"rejected: {exc.reason.value}")
        assert exc.reason in set(Reason)
        assert isinstance(exc.detail, str) and exc.detail.strip()
        assert str(exc).startswith(exc.reason.value + ": ")
        # the detail goes to a TEXT column and a Kafka header: it must be storable itself
        assert b"\x00" not in exc.detail.encode("utf-8")
        return None
    assert isinstance(parsed, TalkEvent | SkippedEvent)
    event(f"accepted: {type(parsed).__name__}")
    if isinstance(parsed, SkippedEvent):
        assert parsed.msg_type in (2, 3)
        assert parsed.kind in ("signal", "quality")
    else:
        assert 0 <= parsed.uid <= BIGINT_MAX
        assert 0 <= parsed.grp_id <= BIGINT_MAX
        assert 0 <= parsed.timestamp <= MAX_TIMESTAMP
        assert parsed.file_path and parsed.file_path == parsed.file_path.strip()
        assert parsed.m_type
        assert parsed.sender_md5 is None or re.fullmatch(r"[0-9a-f]{32}", parsed.sender_md5)
        assert parsed.event_time.tzinfo is not None
        # every text the event keeps can be stored in Postgres TEXT as is
        for text in (parsed.m_type, parsed.file_path, parsed.source_ip):
            if text is not None:
                assert b"\x00" not in text.encode("utf-8")
                assert not UNSTORABLE.search(text)
    return parsed


# --- arbitrary input -----------------------------------------------------------------------


@settings(FUZZ, max_examples=5000)
@given(st.binary(max_size=512))
@example(b"1" * 5000)  # more digits than Python's int() accepts
@example(b"[" * 50_000)  # deeper than the recursion limit
@example(b'{"msg_type": 1, "ptt_msg": {"uid": 1e999}}')
def test_arbitrary_bytes(value: bytes) -> None:
    check(value)


@settings(FUZZ, max_examples=2000)
@given(st.text(max_size=256))
def test_arbitrary_text(value: str) -> None:
    check(value)
    check(value.encode("utf-8", "surrogatepass"))


# --- JSON-ish records ----------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    any_text,  # NUL, controls, lone surrogates (json.dumps escapes them as \uXXXX)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
# cheaper, non-recursive odd values for the fields themselves
shallow = st.one_of(
    scalars,
    st.lists(scalars, max_size=2),
    st.dictionaries(st.text(max_size=4), scalars, max_size=2),
)


SPACES = st.sampled_from(["", "", " ", "\t", "\n", "\u00a0", "\u3000"])


def valid_id(maximum: int) -> st.SearchStrategy[Any]:
    """What a tolerant parser accepts: an int in range or its decimal string, maybe padded."""
    number = st.integers(min_value=0, max_value=maximum)
    return st.one_of(number, st.builds(lambda a, n, b: f"{a}{n}{b}", SPACES, number, SPACES))


def odd_id(maximum: int) -> st.SearchStrategy[Any]:
    """Values around the valid range of an id field, in every other shape the parser meets."""
    number = st.one_of(
        st.integers(min_value=maximum - 3, max_value=maximum + 3),
        st.integers(min_value=-5, max_value=5),
        st.integers(),
    )
    return st.one_of(
        number,
        st.builds(lambda a, n, b: f"{a}{n}{b}", SPACES, number, SPACES),
        shallow,
        st.text(alphabet="-+0123456789 .eE", max_size=25),
    )


def field(valid: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually valid (8 in 10), sometimes of another value or type, sometimes absent."""
    choices = {"valid": valid, "odd": odd, "absent": st.just(ABSENT)}
    # (st.one_of picks among *distinct* strategies, so weights go through sampled_from)
    return st.sampled_from(["valid"] * 8 + ["odd", "absent"]).flatmap(choices.__getitem__)


def present(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not ABSENT}


md5_valid = st.one_of(st.just("md5"), st.none(), HEX32)
md5_odd = st.one_of(st.text(alphabet="0123456789abcdefABCDEF", min_size=30, max_size=34), shallow)
url_valid = st.one_of(
    st.just("https://dev.yunptt.com:9666/room_1_user_14_1569569695.mp3"),
    st.text(min_size=1, max_size=60),
)
url_odd = st.one_of(
    st.sampled_from(["", " ", "\n"]),
    st.integers(min_value=2040, max_value=2060).map(lambda n: "https://h/" + "a" * (n - 10)),
    shallow,
)
m_type_valid = st.one_of(st.just("ptt"), st.none(), st.text(min_size=1, max_size=32))
m_type_odd = st.one_of(st.text(max_size=40), shallow)

ptt_msgs = st.fixed_dictionaries(
    {
        "uid": field(valid_id(BIGINT_MAX), odd_id(BIGINT_MAX)),
        "grp_id": field(valid_id(BIGINT_MAX), odd_id(BIGINT_MAX)),
        "timestamp": field(valid_id(MAX_TIMESTAMP), odd_id(MAX_TIMESTAMP)),
        "md5": field(md5_valid, md5_odd),
        "file_path": field(url_valid, url_odd),
        "m_type": field(m_type_valid, m_type_odd),
    }
).map(present)
envelopes = st.fixed_dictionaries(
    {
        "msg_type": field(st.sampled_from([1, 1, 1, 2, 3, "1", " 2 "]), odd_id(2**31)),
        "ip": field(st.just("127.0.0.1"), shallow),
        "ptt_msg": field(ptt_msgs, json_values),
        "signal_msg": st.one_of(st.just(ABSENT), shallow),
    }
).map(present)
# records shaped like Janus' (each field present or not, of any type), or any JSON at all
records = st.sampled_from([envelopes] * 4 + [json_values]).flatmap(lambda strategy: strategy)


def encode(doc: Any, as_text: bool) -> bytes | str:
    text = json.dumps(doc, allow_nan=True)
    return text if as_text else text.encode("utf-8", "surrogatepass")


@settings(FUZZ, max_examples=5000)
@given(records, st.booleans())
def test_arbitrary_records(doc: Any, as_text: bool) -> None:
    event = check(encode(doc, as_text))
    if isinstance(event, TalkEvent):
        key = object_key(event, "0123456789ABCDEF0123456789abcdef")
        assert OBJECT_KEY.fullmatch(key)


# --- accepted events and their object keys -------------------------------------------------


def as_id(value: int) -> st.SearchStrategy[Any]:
    return st.sampled_from([value, str(value), f" {value} ", f"{value}\n", f"{value:019d}"])


@st.composite
def valid_records(draw: st.DrawFn) -> tuple[dict[str, Any], int, int, int]:
    uid = draw(st.integers(min_value=0, max_value=BIGINT_MAX))
    grp_id = draw(st.integers(min_value=0, max_value=BIGINT_MAX))
    timestamp = draw(st.integers(min_value=0, max_value=MAX_TIMESTAMP))
    ptt: dict[str, Any] = {
        "uid": draw(as_id(uid)),
        "grp_id": draw(as_id(grp_id)),
        "timestamp": draw(as_id(timestamp)),
        "file_path": draw(
            st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=80).filter(
                lambda s: s.strip()
            )
        ),
    }
    md5 = draw(st.one_of(st.just(ABSENT), st.none(), md5_valid, md5_odd))
    if md5 is not ABSENT:
        ptt["md5"] = md5
    m_type = draw(
        st.one_of(
            st.just(ABSENT),
            st.none(),
            st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=32),
        )
    )
    if m_type is not ABSENT:
        ptt["m_type"] = m_type
    ip = draw(  # tolerated: dropped when not a string of 1..64 characters, else kept
        st.one_of(
            st.just(ABSENT),
            st.just("127.0.0.1"),
            clean_text,
            st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=65, max_size=80),
            st.none(),
            st.integers(),
            st.lists(st.integers(), max_size=2),
        )
    )
    doc = {"msg_type": draw(st.sampled_from([1, "1", " 1"])), "ptt_msg": ptt}
    if ip is not ABSENT:
        doc["ip"] = ip
    return (
        doc,
        uid,
        grp_id,
        timestamp,
    )


@settings(FUZZ, max_examples=2500)
@given(valid_records(), HEX32, st.booleans())
def test_valid_records_are_accepted_with_a_well_formed_key(
    generated: tuple[dict[str, Any], int, int, int], md5: str, as_text: bool
) -> None:
    doc, uid, grp_id, timestamp = generated
    event = check(encode(doc, as_text))
    assert isinstance(event, TalkEvent)
    assert (event.uid, event.grp_id, event.timestamp) == (uid, grp_id, timestamp)
    key = object_key(event, md5)
    assert OBJECT_KEY.fullmatch(key)
    assert key == object_key(event, md5.lower())  # deterministic, case-insensitive md5
    assert key.startswith(f"{grp_id}/{uid}/{event.event_time:%Y/%m/%d}/{timestamp}-")
    assert not math.isnan(event.event_time.timestamp())


# --- object keys cannot be steered by the record (issue 6, point 3) -------------------------

# Fragments an attacker would put in a record to change the key's shape: traversal,
# percent-encoding, separators, unicode look-alikes of digits / dots / slashes, control
# characters, signs and exponents that int() or float() would accept, over-long values.
ATTACK_FRAGMENTS = [
    "../",
    "..\\",
    "/",
    "\\",
    "%2e%2e%2f",
    "%2F",
    "%00",
    "\x00",
    "\u2024\u2024/",  # one-dot leaders
    "\uff0e\uff0e\uff0f",  # fullwidth ./
    "\u2215",  # division slash
    "\u0661\u0662\u0663",  # Arabic-Indic digits (str.isdigit() is True)
    "\uff11\uff12\uff13",  # fullwidth digits
    "\u00b9\u00b2",  # superscript digits
    "\U0001d7ce\U0001d7cf",  # mathematical bold digits
    "1_000",  # int() accepts underscores
    "+1",
    "-1",
    "1e3",
    "0x1f",
    " 1 ",
    "\u200b1",  # zero-width space
    "1\n2",
    ".mp3",
    "*",
    "?x=1",
    "#",
    "~",
    "1" * 20,  # past bigint
    "9" * 5000,  # past int()'s digit limit
]
attack_text = st.lists(
    st.one_of(st.sampled_from(ATTACK_FRAGMENTS), st.text(max_size=6), st.integers(0, 99).map(str)),
    min_size=1,
    max_size=6,
).map("".join)
hostile = st.one_of(
    attack_text,
    st.builds(lambda a, n: f"{a}{n}", st.sampled_from(ATTACK_FRAGMENTS), st.integers(0, 99)),
    st.builds(lambda n, a: f"{n}{a}", st.integers(0, 99), st.sampled_from(ATTACK_FRAGMENTS)),
    st.builds(  # very long
        lambda a, n: (a * n)[:3000], st.sampled_from(ATTACK_FRAGMENTS), st.integers(100, 3000)
    ),
)


def id_or_attack(maximum: int) -> st.SearchStrategy[Any]:
    """Usually a valid id (so the key builder is reached), else an attack-shaped value."""
    choices = {"valid": valid_id(maximum), "hostile": hostile}
    return st.sampled_from(["valid"] * 3 + ["hostile"]).flatmap(choices.__getitem__)


attack_value = id_or_attack(BIGINT_MAX)
attack_timestamp = id_or_attack(MAX_TIMESTAMP)
attack_md5 = st.one_of(
    HEX32,
    st.builds(lambda a, h: (a + h)[:32], st.sampled_from(ATTACK_FRAGMENTS), HEX32),
    attack_text,
)
SAFE_KEY_CHARS = set("0123456789abcdef/-.mp")


@settings(FUZZ, max_examples=2500)
@given(
    st.fixed_dictionaries(
        {
            "uid": attack_value,
            "grp_id": attack_value,
            "timestamp": attack_timestamp,
            "md5": attack_md5,
            "file_path": st.one_of(attack_text, hostile.map(lambda v: f"https://h/{v}")),
            "m_type": attack_text,
        }
    ),
    st.one_of(hostile, st.just("127.0.0.1")),
    st.one_of(HEX32, attack_md5),
)
def test_attack_shaped_fields_cannot_change_the_key_shape(
    ptt: dict[str, Any], ip: Any, computed_md5: str
) -> None:
    parsed = check(json.dumps({"msg_type": 1, "ip": ip, "ptt_msg": ptt}))
    if not isinstance(parsed, TalkEvent):
        return  # rejected with a clear reason (checked by check())
    # only plain ASCII decimal ids get through, whatever their spelling in the record
    for name in ("uid", "grp_id", "timestamp"):
        raw = ptt[name]
        assert str(raw).strip().isascii() and str(raw).strip().isdecimal()
        assert getattr(parsed, name) == int(str(raw).strip())
    try:
        key = object_key(parsed, computed_md5)
    except ValueError as exc:  # the md5 is computed by fileserver; anything else is a bug
        assert not re.fullmatch(r"[0-9a-fA-F]{32}", computed_md5)
        assert "md5 must be 32 hex digits" in str(exc)
        return
    assert OBJECT_KEY.fullmatch(key)
    assert set(key) <= SAFE_KEY_CHARS and ".." not in key and len(key) <= 100
    # the key depends on nothing but the validated ids, the time and the computed md5
    clean = TalkEvent(
        uid=parsed.uid,
        grp_id=parsed.grp_id,
        m_type="ptt",
        file_path="https://gw.example/a.mp3",
        timestamp=parsed.timestamp,
        sender_md5=None,
        source_ip=None,
    )
    assert key == object_key(clean, computed_md5)
    assert key.split("/")[:2] == [str(parsed.grp_id), str(parsed.uid)]


@pytest.mark.parametrize("fragment", ATTACK_FRAGMENTS)
@pytest.mark.parametrize("name", ["uid", "grp_id", "timestamp"])
def test_each_attack_fragment_in_an_id_is_rejected_naming_the_field(
    fragment: str, name: str
) -> None:
    ptt = {"uid": 14, "grp_id": 1, "timestamp": 1569569697, "file_path": "https://h/a.mp3"}
    for value in (fragment, f"1{fragment}", f"{fragment}1"):
        ptt[name] = value
        try:
            parsed = parse_event(json.dumps({"msg_type": 1, "ptt_msg": ptt}))
        except PermanentError as exc:
            assert exc.reason is Reason.INVALID_EVENT
            assert f"ptt_msg.{name}" in exc.detail
            continue
        # only surrounding whitespace around ASCII digits is tolerated
        assert isinstance(parsed, TalkEvent)
        assert value.strip().isascii() and value.strip().isdecimal()
        assert OBJECT_KEY.fullmatch(object_key(parsed, "0" * 32))


# --- text Postgres cannot store (issue "Never lose or stall an event", part 2) -------------


@settings(FUZZ, max_examples=3000)
@given(
    valid_records(),
    st.sampled_from(["ip", "ptt_msg.m_type", "ptt_msg.file_path"]),
    clean_text,
    bad_char,
    clean_text,
    st.sampled_from(["bytes", "text", "text-raw"]),
)
@example(
    (
        {"msg_type": 1, "ptt_msg": {"uid": 1, "grp_id": 1, "timestamp": 1, "file_path": "u"}},
        1,
        1,
        1,
    ),
    "ptt_msg.file_path",
    "",
    "\ud800",
    "",
    "bytes",
)
def test_unstorable_character_in_a_kept_field_is_invalid_event(
    generated: tuple[dict[str, Any], int, int, int],
    name: str,
    left: str,
    bad: str,
    right: str,
    encoding: str,
) -> None:
    doc, *_ = generated
    # inside the value (file_path's surrounding whitespace would be stripped, not kept)
    value = f"a{left}{bad}{right}z" if name != "ptt_msg.m_type" else f"{left}{bad}{right}"[:32]
    if name == "ip":
        doc["ip"] = value  # any length: a corrupt string is refused, not dropped
    else:
        doc["ptt_msg"][name.removeprefix("ptt_msg.")] = value
    if encoding == "bytes":  # what Kafka carries: UTF-8 JSON, the character as \uXXXX
        record: bytes | str = json.dumps(doc).encode()
    else:  # a str value, the character escaped or raw
        record = json.dumps(doc, ensure_ascii=encoding == "text")
    with pytest.raises(PermanentError) as info:
        parse_event(record)
    exc = info.value
    assert exc.reason is Reason.INVALID_EVENT
    assert exc.detail.startswith(f"{name} contains ")
    first_bad = UNSTORABLE.search(value)
    assert first_bad is not None
    assert ascii(first_bad.group()) in exc.detail  # shown escaped, e.g. '\x00' or '\ud800'
    assert exc.detail.isascii()  # so the detail is storable and printable anywhere


@settings(FUZZ, max_examples=2000)
@given(
    st.fixed_dictionaries(
        {
            "uid": st.integers(0, 99),
            "grp_id": st.integers(0, 99),
            "timestamp": st.integers(0, 99),
            "file_path": any_text,
            "m_type": st.one_of(st.none(), any_text),
            "md5": st.one_of(HEX32, any_text),
        }
    ),
    st.one_of(st.none(), any_text, st.integers()),
    st.booleans(),
)
def test_any_text_in_the_fields_is_storable_or_invalid_event(
    ptt: dict[str, Any], ip: Any, as_text: bool
) -> None:
    doc = {"msg_type": 1, "ip": ip, "ptt_msg": ptt}
    parsed = check(encode(doc, as_text))  # never another exception; kept text storable
    if parsed is None:
        return
    assert isinstance(parsed, TalkEvent)
    # as the parser saw them: JSON joins an escaped surrogate pair into one character
    seen = json.loads(json.dumps(doc))
    kept = [seen["ptt_msg"]["file_path"].strip(), seen["ptt_msg"]["m_type"] or "ptt"]
    kept += [seen["ip"]] if isinstance(seen["ip"], str) else []
    assert not any(UNSTORABLE.search(text) for text in kept)


@pytest.mark.parametrize("msg_type", [2, 3])
@given(bad=bad_char)
@settings(FUZZ, max_examples=50)
def test_skipped_types_ignore_unstorable_ip(msg_type: int, bad: str) -> None:
    # nothing of a msg_type 2/3 record is kept, so nothing in it can fail an INSERT
    assert parse_event(json.dumps({"msg_type": msg_type, "ip": f"1{bad}"})) == SkippedEvent(
        msg_type
    )
