"""parse_event / object_key: the seed's examples verbatim, the tolerances, every rejection."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from fileserver.errors import PermanentError, Reason
from fileserver.events import (
    BIGINT_MAX,
    MAX_TIMESTAMP,
    MAX_URL_LENGTH,
    SkippedEvent,
    TalkEvent,
    object_key,
    parse_event,
)

URL = "https://dev.yunptt.com:9666/room_1_user_14_1569569695.mp3"

# The seed's three examples, byte for byte as the contract shows them.
SEED_TALK = """{
  "msg_type": 1,
  "ip": "127.0.0.1",
  "ptt_msg": {
    "uid": "14",
    "md5": "md5",
    "grp_id": "1",
    "timestamp": "1569569697",
    "file_path": "https://dev.yunptt.com:9666/room_1_user_14_1569569695.mp3"
  }
}"""
SEED_SIGNAL = """{"msg_type": 2, "ip": "127.0.0.1",
 "signal_msg": {"signal_type": 1,
   "create_group_resp": {"gid": 470, "group_name": "0929group1128", "dispatcher_id": 7},
   "res": {"code": 0, "msg": "command executed successfully"}}}"""
SEED_QUALITY = """{"msg_type": 3, "ip": "127.0.0.1",
 "quality_msg": {"user_id": 62, "user_status": 1, "in_link_quality": 100,
   "in_media_link_quality": 100, "out_link_quality": 100,
   "out_media_link_quality": 100, "rtt": 100}}"""

HEX = "0123456789abcdef0123456789abcdef"
OBJECT_KEY = re.compile(r"^\d+/\d+/\d{4}/\d{2}/\d{2}/\d+-[0-9a-f]{32}\.mp3$")


def talk(**ptt_changes: Any) -> dict[str, Any]:
    """The seed's talk record with ``ptt_msg`` fields replaced (``...`` removes one)."""
    ptt: dict[str, Any] = {
        "uid": "14",
        "md5": "md5",
        "grp_id": "1",
        "timestamp": "1569569697",
        "file_path": URL,
    }
    for name, value in ptt_changes.items():
        if value is ...:
            ptt.pop(name, None)
        else:
            ptt[name] = value
    return {"msg_type": 1, "ip": "127.0.0.1", "ptt_msg": ptt}


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def parse_talk(doc: Any) -> TalkEvent:
    event = parse_event(encode(doc))
    assert isinstance(event, TalkEvent)
    return event


def rejection(value: bytes | str | None) -> PermanentError:
    with pytest.raises(PermanentError) as info:
        parse_event(value)
    return info.value


# --- the seed's examples -------------------------------------------------------------------


@pytest.mark.parametrize("as_type", [bytes, str])
def test_seed_talk_example_verbatim(as_type: type) -> None:
    value = SEED_TALK.encode() if as_type is bytes else SEED_TALK
    event = parse_event(value)
    assert event == TalkEvent(
        uid=14,
        grp_id=1,
        m_type="ptt",
        file_path=URL,
        timestamp=1569569697,
        sender_md5=None,
        source_ip="127.0.0.1",
    )
    assert isinstance(event, TalkEvent)
    assert event.event_time == datetime(2019, 9, 27, 7, 34, 57, tzinfo=UTC)
    assert event.event_time.utcoffset() is not None


@pytest.mark.parametrize(
    ("value", "msg_type", "kind"),
    [(SEED_SIGNAL, 2, "signal"), (SEED_QUALITY, 3, "quality")],
)
def test_seed_skipped_examples_verbatim(value: str, msg_type: int, kind: str) -> None:
    event = parse_event(value.encode())
    assert event == SkippedEvent(msg_type)
    assert isinstance(event, SkippedEvent)
    assert event.kind == kind


@pytest.mark.parametrize("msg_type", [2, 3, "2", " 3 "])
def test_skipped_types_need_no_payload(msg_type: Any) -> None:
    event = parse_event(encode({"msg_type": msg_type}))
    assert isinstance(event, SkippedEvent)
    assert event.msg_type == int(str(msg_type).strip())


# --- tolerance -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (14, 14),
        ("14", 14),
        (" 14 ", 14),
        ("\t14\n", 14),
        ("0014", 14),
        (0, 0),
        ("0", 0),
        (BIGINT_MAX, BIGINT_MAX),
        (str(BIGINT_MAX), BIGINT_MAX),
    ],
)
@pytest.mark.parametrize("field", ["uid", "grp_id"])
def test_ids_accept_int_or_decimal_string(field: str, raw: Any, expected: int) -> None:
    event = parse_talk(talk(**{field: raw}))
    assert getattr(event, field) == expected


@pytest.mark.parametrize(
    ("ptt_changes", "expected"),
    [
        ({"m_type": ...}, "ptt"),
        ({"m_type": None}, "ptt"),
        ({"m_type": "ptt"}, "ptt"),
        ({"m_type": "sos"}, "sos"),
        ({"m_type": "x" * 32}, "x" * 32),
    ],
)
def test_m_type_defaults_to_ptt(ptt_changes: dict[str, Any], expected: str) -> None:
    assert parse_talk(talk(**ptt_changes)).m_type == expected


@pytest.mark.parametrize(
    ("md5", "expected"),
    [
        (..., None),
        (None, None),
        ("md5", None),
        ("", None),
        ("z" * 32, None),
        (HEX[:31], None),
        (HEX + "0", None),
        (" " + HEX[1:], None),
        (12345, None),
        ([HEX], None),
        (HEX, HEX),
        (HEX.upper(), HEX),
        ("D41D8CD98F00B204E9800998ECF8427E", "d41d8cd98f00b204e9800998ecf8427e"),
    ],
)
def test_sender_md5_only_when_a_real_digest(md5: Any, expected: str | None) -> None:
    assert parse_talk(talk(md5=md5)).sender_md5 == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1569569697, 1569569697),
        ("1569569697", 1569569697),
        (" 1569569697 ", 1569569697),
        (0, 0),
        (MAX_TIMESTAMP, MAX_TIMESTAMP),
        (str(MAX_TIMESTAMP), MAX_TIMESTAMP),
    ],
)
def test_timestamp_int_or_string(raw: Any, expected: int) -> None:
    event = parse_talk(talk(timestamp=raw))
    assert event.timestamp == expected
    assert event.event_time == datetime.fromtimestamp(expected, tz=UTC)


@pytest.mark.parametrize(
    ("ip", "expected"),
    [("127.0.0.1", "127.0.0.1"), ("", None), (12, None), ("x" * 65, None), (None, None)],
)
def test_source_ip_kept_only_when_plausible(ip: Any, expected: str | None) -> None:
    doc = talk()
    doc["ip"] = ip
    assert parse_talk(doc).source_ip == expected


def test_file_path_surrounding_spaces_are_stripped() -> None:
    assert parse_talk(talk(file_path=f"  {URL}\n")).file_path == URL


def test_file_path_at_max_length_accepted() -> None:
    url = "https://h/" + "a" * (MAX_URL_LENGTH - len("https://h/"))
    assert parse_talk(talk(file_path=url)).file_path == url


def test_unknown_extra_fields_are_ignored() -> None:
    doc = talk(extra={"a": 1})
    doc["other"] = [1, 2]
    assert parse_talk(doc).uid == 14


# --- rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        "",
        b"   ",
        b"\xff\xfe\x00",
        b'{"msg_type": 1, "ip": "\xc3\x28"}',
        b"not json",
        b'{"msg_type": 1',
        b"{'msg_type': 1}",
        b'{"msg_type": 1,}',
        "\ufeff" + SEED_TALK,
        b"[" * 100_000,
    ],
)
def test_malformed_json(value: bytes | str | None) -> None:
    exc = rejection(value)
    assert exc.reason is Reason.MALFORMED_JSON
    assert exc.detail


@pytest.mark.parametrize(
    ("value", "detail_part"),
    [
        (b"[]", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (b"1", "JSON object"),
        (b"1.5", "JSON object"),
        (b'"text"', "JSON object"),
        (b"null", "JSON object"),
        (b"true", "JSON object"),
        (b"{}", "msg_type"),
        (b'{"ip": "127.0.0.1"}', "msg_type"),
        (b'{"msg_type": null}', "msg_type"),
        (b'{"msg_type": "abc"}', "msg_type"),
        (b'{"msg_type": true}', "msg_type"),
        (b'{"msg_type": false}', "msg_type"),
        (b'{"msg_type": 1.0}', "msg_type"),
        (b'{"msg_type": -1}', "msg_type"),
        (b'{"msg_type": "-1"}', "msg_type"),
        (b'{"msg_type": 0}', "msg_type"),
        (b'{"msg_type": 4}', "msg_type"),
        (b'{"msg_type": 7}', "msg_type"),
        (b'{"msg_type": [1]}', "msg_type"),
        (b'{"msg_type": 99999999999999999999}', "msg_type"),
        (b'{"msg_type": 1}', "ptt_msg"),
        (b'{"msg_type": 1, "ptt_msg": null}', "ptt_msg"),
        (b'{"msg_type": 1, "ptt_msg": "uid=14"}', "ptt_msg"),
        (b'{"msg_type": 1, "ptt_msg": [1]}', "ptt_msg"),
        (b'{"msg_type": 1, "ptt_msg": 14}', "ptt_msg"),
    ],
)
def test_invalid_envelope(value: bytes, detail_part: str) -> None:
    exc = rejection(value)
    assert exc.reason is Reason.INVALID_EVENT
    assert detail_part in exc.detail


BAD_IDS = [
    -1,
    "-1",
    "+1",
    1.0,
    14.5,
    True,
    False,
    "1e3",
    "0x10",
    "",
    "   ",
    "1 4",
    "١٤",  # Arabic-Indic digits: not ASCII decimal
    "14abc",
    BIGINT_MAX + 1,
    str(BIGINT_MAX + 1),
    "9" * 20,
    2**64,
    None,
    [14],
    {"v": 14},
    ...,
]


@pytest.mark.parametrize("raw", BAD_IDS, ids=repr)
@pytest.mark.parametrize("field", ["uid", "grp_id"])
def test_invalid_ids(field: str, raw: Any) -> None:
    exc = rejection(encode(talk(**{field: raw})))
    assert exc.reason is Reason.INVALID_EVENT
    assert f"ptt_msg.{field}" in exc.detail


@pytest.mark.parametrize(
    "raw",
    [
        1569569697000,  # milliseconds
        "1569569697000",
        MAX_TIMESTAMP + 1,
        -1,
        "-1569569697",
        1569569697.5,
        "1569569697.0",
        "2019-09-27T07:34:57Z",
        True,
        None,
        ...,
        "",
    ],
    ids=repr,
)
def test_invalid_timestamp(raw: Any) -> None:
    exc = rejection(encode(talk(timestamp=raw)))
    assert exc.reason is Reason.INVALID_EVENT
    assert "ptt_msg.timestamp" in exc.detail


@pytest.mark.parametrize(
    "raw",
    [..., None, "", "   ", 12, True, [URL], {"url": URL}, "h" * (MAX_URL_LENGTH + 1)],
    ids=lambda v: repr(v)[:30],
)
def test_invalid_file_path(raw: Any) -> None:
    exc = rejection(encode(talk(file_path=raw)))
    assert exc.reason is Reason.INVALID_EVENT
    assert "ptt_msg.file_path" in exc.detail


@pytest.mark.parametrize("raw", [1, True, ["ptt"], {"t": "ptt"}, "", "x" * 33], ids=repr)
def test_invalid_m_type(raw: Any) -> None:
    exc = rejection(encode(talk(m_type=raw)))
    assert exc.reason is Reason.INVALID_EVENT
    assert "ptt_msg.m_type" in exc.detail


@pytest.mark.parametrize(
    "value",
    [
        b"1" * 5000,
        b'{"msg_type": ' + b"1" * 5000 + b"}",
        b'{"msg_type": 1, "ptt_msg": {"uid": ' + b"9" * 5000 + b"}}",
    ],
    ids=["top-level", "msg_type", "uid"],
)
def test_huge_json_integers_are_a_permanent_error(value: bytes) -> None:
    # Python refuses int() of more than 4300 digits with a plain ValueError; parse_event
    # must still answer with a PermanentError, never an arbitrary exception.
    exc = rejection(value)
    assert exc.reason in (Reason.MALFORMED_JSON, Reason.INVALID_EVENT)


def test_permanent_error_message_carries_reason() -> None:
    exc = rejection(b"[]")
    assert str(exc).startswith("invalid_event: ")


# --- text Postgres cannot store: NUL, surrogates, control characters -----------------------

# (JSON escape as it appears in the record, the character shown in the detail)
UNSTORABLE = [
    (r"\u0000", r"'\x00' (U+0000)"),
    (r"\ud800", r"'\ud800' (U+D800)"),  # a lone high surrogate: json.loads accepts it
    (r"\udfff", r"'\udfff' (U+DFFF)"),  # a lone low surrogate
    (r"\t", r"'\t' (U+0009)"),
    (r"\n", r"'\n' (U+000A)"),
    (r"\r", r"'\r' (U+000D)"),
    (r"\u001b", r"'\x1b' (U+001B)"),  # ESC: terminal escape sequences in logs
    (r"\u007f", r"'\x7f' (U+007F)"),  # DEL
    (r"\u0085", r"'\x85' (U+0085)"),  # NEL, a C1 line break
    (r"\u009f", r"'\x9f' (U+009F)"),  # last C1
]


def with_raw(field: str, raw_json_string: str) -> bytes:
    """The seed's talk record with ``field`` set to a JSON string literal written as is."""
    doc = talk()
    doc["ip"] = "127.0.0.1"
    placeholder = "@@RAW@@"
    if field == "ip":
        doc["ip"] = placeholder
    else:
        doc["ptt_msg"][field.removeprefix("ptt_msg.")] = placeholder
    return json.dumps(doc).replace(f'"{placeholder}"', f'"{raw_json_string}"').encode()


@pytest.mark.parametrize(("escape", "shown"), UNSTORABLE, ids=[e for e, _ in UNSTORABLE])
@pytest.mark.parametrize("field", ["ip", "ptt_msg.m_type", "ptt_msg.file_path"])
def test_unstorable_character_is_invalid_event_naming_the_field(
    field: str, escape: str, shown: str
) -> None:
    value = f"https://h/a{escape}b.mp3" if field == "ptt_msg.file_path" else f"x{escape}y"
    exc = rejection(with_raw(field, value))
    assert exc.reason is Reason.INVALID_EVENT
    assert exc.detail.startswith(f"{field} contains ")
    assert shown in exc.detail
    assert exc.detail.isascii()  # storable in TEXT, printable in a log line
    exc.detail.encode("utf-8")


def test_unstorable_detail_says_what_and_where() -> None:
    exc = rejection(with_raw("ptt_msg.file_path", r"https://h/a\u0000.mp3"))
    assert exc.detail == "ptt_msg.file_path contains a NUL character '\\x00' (U+0000) at index 11"
    exc = rejection(with_raw("ip", r"1\ud800"))
    assert exc.detail == "ip contains a surrogate (not UTF-8) '\\ud800' (U+D800) at index 1"
    exc = rejection(with_raw("ptt_msg.m_type", r"p\u0007"))
    assert exc.detail == "ptt_msg.m_type contains a control character '\\x07' (U+0007) at index 1"


@pytest.mark.parametrize("ip", ["x" * 65 + "\x00", "\x00", "\ud800" * 100])
def test_ip_string_with_unstorable_character_is_refused_whatever_its_length(ip: str) -> None:
    # wrong types and lengths are dropped (provenance only); a corrupt string is not
    doc = talk()
    doc["ip"] = ip
    exc = rejection(json.dumps(doc))
    assert exc.reason is Reason.INVALID_EVENT
    assert exc.detail.startswith("ip contains ")


def test_file_path_whitespace_controls_at_the_edges_are_stripped_not_refused() -> None:
    assert parse_talk(talk(file_path=f"\t{URL}\r\n")).file_path == URL
    exc = rejection(encode(talk(file_path=f"{URL[:20]}\t{URL[20:]}")))
    assert "ptt_msg.file_path contains a control character '\\t'" in exc.detail


@pytest.mark.parametrize(
    ("raw_json", "expected"),
    [
        (r"\ud83d\ude00", "\U0001f600"),  # an escaped surrogate *pair* is one real character
        ("对讲", "对讲"),
        (r"\u200b", "\u200b"),  # format characters (Cf) are storable and kept
        (r"\u00a0", "\u00a0"),  # U+00A0 is the first character after C1
        (r"\ufffd", "\ufffd"),
    ],
)
def test_storable_non_ascii_text_is_kept(raw_json: str, expected: str) -> None:
    event = parse_event(with_raw("ptt_msg.m_type", f"p{raw_json}"))
    assert isinstance(event, TalkEvent)
    assert event.m_type == f"p{expected}"
    event.m_type.encode("utf-8")


@pytest.mark.parametrize("msg_type", [2, 3])
def test_skipped_types_keep_nothing_so_unstorable_ip_is_fine(msg_type: int) -> None:
    assert parse_event(f'{{"msg_type": {msg_type}, "ip": "\\u0000\\ud800"}}') == SkippedEvent(
        msg_type
    )


def test_unstorable_md5_is_just_not_a_digest() -> None:
    # md5 is kept only when it is 32 hex digits; anything else is ignored as before
    assert parse_talk(talk(md5="\x00" * 32)).sender_md5 is None


# --- object_key ----------------------------------------------------------------------------


def test_object_key_layout_for_seed_event() -> None:
    event = parse_talk(json.loads(SEED_TALK))
    assert object_key(event, HEX) == f"1/14/2019/09/27/1569569697-{HEX}.mp3"


@pytest.mark.parametrize(
    ("uid", "grp_id", "timestamp", "md5", "expected"),
    [
        (14, 1, 0, HEX, f"1/14/1970/01/01/0-{HEX}.mp3"),
        (7, 470, 1577836799, HEX.upper(), f"470/7/2019/12/31/1577836799-{HEX}.mp3"),
        (7, 470, 1577836800, HEX, f"470/7/2020/01/01/1577836800-{HEX}.mp3"),
        (0, 0, MAX_TIMESTAMP, HEX, f"0/0/9999/12/31/{MAX_TIMESTAMP}-{HEX}.mp3"),
        (
            BIGINT_MAX,
            BIGINT_MAX,
            951782400,  # 2000-02-29, leap day
            HEX,
            f"{BIGINT_MAX}/{BIGINT_MAX}/2000/02/29/951782400-{HEX}.mp3",
        ),
    ],
)
def test_object_key_layout(uid: int, grp_id: int, timestamp: int, md5: str, expected: str) -> None:
    event = parse_talk(talk(uid=uid, grp_id=grp_id, timestamp=timestamp))
    key = object_key(event, md5)
    assert key == expected
    assert OBJECT_KEY.fullmatch(key)


def test_object_key_is_deterministic_and_ignores_noise() -> None:
    a = parse_talk(talk(uid="14", md5="md5"))
    b = parse_talk(talk(uid=" 14 ", md5=HEX, m_type="sos", file_path=URL + "?x=1"))
    assert object_key(a, HEX) == object_key(a, HEX) == object_key(b, HEX)
    assert object_key(a, HEX) != object_key(a, "f" * 32)


@pytest.mark.parametrize(
    "md5",
    ["md5", "", HEX[:31], HEX + "a", "g" * 32, "../" + HEX[3:], HEX[:-1] + "\n", " " * 32],
    ids=repr,
)
def test_object_key_rejects_non_hex_md5(md5: str) -> None:
    event = parse_talk(talk())
    with pytest.raises(ValueError, match="md5"):
        object_key(event, md5)
