"""fileserver.storage.http11's response parser (llhttp, through httptools) and request
encoder, without I/O: examples of each framing and rule, then hypothesis properties
over arbitrary and near-valid responses fed whole and in random splits, read whole and
streamed (the body handed over piece by piece, as the download wire reads it)."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fileserver.storage.http11 import (
    Head,
    Pool,
    ProtocolError,
    Response,
    ResponseParser,
    ServerDisconnected,
    origin_of,
)

OK = b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: "x"\r\n\r\nhello'


def feed_all(raw: bytes, *, step: int | None = None, **kw: object) -> Response | None:
    """Feed ``raw`` whole, or ``step`` bytes at a time; the first complete response."""
    parser = ResponseParser(**kw)  # type: ignore[arg-type]
    pieces = [raw] if step is None else [raw[i : i + step] for i in range(0, len(raw), step)]
    for piece in pieces:
        response = parser.feed(piece)
        if response is not None:
            return response
    return None


@pytest.mark.parametrize("step", [None, 1, 3, 7])
def test_content_length_response_in_any_pieces(step: int | None) -> None:
    response = feed_all(OK, step=step)
    assert response == Response(200, "OK", {"content-length": "5", "etag": '"x"'}, b"hello", True)


@pytest.mark.parametrize("step", [None, 1, 4])
def test_chunked_response_with_extensions_and_trailers(step: int | None) -> None:
    raw = (
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;name=value\r\n<Err\r\nA\r\nor>Denied<\r\n0\r\nX-Trailer: 1\r\n\r\n"
    )
    response = feed_all(raw, step=step)
    assert response is not None
    assert (response.status, response.body, response.keep_alive) == (403, b"<Error>Denied<", True)
    assert "x-trailer" not in response.headers  # trailers are not headers


@pytest.mark.parametrize("streamed", [False, True])
def test_a_parser_that_returned_its_response_is_freed_without_the_collector(
    streamed: bool,
) -> None:
    # llhttp holds the parser's bound callbacks: left as a cycle, ~11 objects per
    # response (two per event) waited for the garbage collector, which was ~19 % of the
    # worker's CPU at full load before the start-up heap was frozen.
    pieces: list[bytes] = []
    kw = {"max_body": None, "on_body": pieces.append} if streamed else {}
    parser = ResponseParser(**kw)  # type: ignore[arg-type]
    assert parser.feed(OK) is not None
    gone = weakref.ref(parser)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del parser
        assert gone() is None
    finally:
        if enabled:
            gc.enable()
    assert pieces == ([b"hello"] if streamed else [])


def test_close_delimited_body_ends_at_eof_and_is_not_kept() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 500 Oops\r\n\r\npart one,") is None
    assert parser.feed(b" part two") is None
    response = parser.feed_eof()
    assert (response.status, response.reason, response.body, response.keep_alive) == (
        500,
        "Oops",
        b"part one, part two",
        False,
    )


def test_a_transfer_coding_other_than_chunked_is_read_until_close() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc") is None
    response = parser.feed_eof()
    assert (response.body, response.keep_alive) == (b"abc", False)


def test_a_chunked_body_cut_by_eof_is_not_a_response() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
    with pytest.raises(ServerDisconnected, match="before the end of the response"):
        parser.feed_eof()


def test_interim_responses_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    response = feed_all(raw, step=2)
    assert response is not None and response.status == 200 and response.body == b"hello"
    assert response.reason == "OK" and "link" not in response.headers


def test_no_body_for_head_204_and_304() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    response = feed_all(head, no_body=True)
    assert response is not None and response.body == b"" and response.keep_alive
    for status in (b"204 No Content", b"304 Not Modified"):
        response = feed_all(b"HTTP/1.1 " + status + b"\r\n\r\n")
        assert response is not None and response.body == b"" and response.keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nextra",  # bytes after the response
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    ],
    ids=[
        "connection-close",
        "http-1.0",
        "http-1.0-keep-alive",
        "trailing-bytes",
        "a-second-response",
        "both-framings",
    ],
)
def test_responses_after_which_the_connection_is_not_reused(raw: bytes) -> None:
    response = feed_all(raw)
    assert response is not None and response.status == 200
    assert response.keep_alive is False


def test_a_body_after_a_head_response_spoils_the_connection() -> None:
    response = feed_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", no_body=True)
    assert response is not None and response.body == b"" and response.keep_alive is False


def test_repeated_headers_are_joined_and_names_lower_cased() -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a:  2 \r\nContent-Length: 0\r\n\r\n"
    response = feed_all(raw, step=3)
    assert response is not None and response.headers["x-a"] == "1, 2"


def test_a_repeated_content_length_is_refused_even_the_same() -> None:
    """llhttp refuses it (RFC 9110 8.6 lets a recipient reject it); no S3 server sends it."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"
    with pytest.raises(ProtocolError, match="Duplicate Content-Length"):
        feed_all(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "Expected HTTP/"),
        (b"HTTP/2 200\r\n\r\n", "Expected dot"),
        (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", r"not an HTTP/1\.x response"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "Invalid status code"),
        (b"HTTP/1.1 099 OK\r\n\r\n", "invalid status code 99"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "Invalid header token"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "Invalid header token"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\n", "Invalid header field char"),
        (b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n", "Invalid header value char"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n", "Content-Length"),
        # U+00B2 passes str.isdigit(): the hand-written parser's int() raised ValueError
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\n", "overflow"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
        (b"HTTP/1.1 101 Switching\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n", "101"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n", "chunk data"),
        (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "CR"),  # bare LF
    ],
)
@pytest.mark.parametrize("step", [None, 1])
def test_malformed_responses_are_protocol_errors(
    raw: bytes, message: str, step: int | None
) -> None:
    with pytest.raises(ProtocolError, match=message):
        feed_all(raw, step=step)


def test_a_refused_response_stays_refused() -> None:
    parser = ResponseParser()
    with pytest.raises(ProtocolError):
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    with pytest.raises(ProtocolError):
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def test_size_limits() -> None:
    with pytest.raises(ProtocolError, match="head over 100 bytes"):
        feed_all(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200, max_head=100)
    with pytest.raises(ProtocolError, match="head over 100 bytes"):  # interim heads count
        feed_all(b"HTTP/1.1 100 Continue\r\n\r\n" * 5, max_head=100)
    with pytest.raises(ProtocolError, match="body over 10 bytes"):
        feed_all(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", max_body=10)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n123"
    with pytest.raises(ProtocolError, match="body over 10 bytes"):
        feed_all(chunked, max_body=10)
    with pytest.raises(ProtocolError, match="body over 10 bytes"):
        feed_all(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11, max_body=10)
    endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 2000
    with pytest.raises(ProtocolError, match=r"framing \(chunk lines, trailers\) over 1000"):
        feed_all(endless, max_head=1000)
    trailer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: " + b"t" * 2000
    with pytest.raises(ProtocolError, match="framing"):
        feed_all(trailer, max_head=1000, step=100)


def test_eof_before_or_within_the_response() -> None:
    parser = ResponseParser()
    with pytest.raises(ServerDisconnected) as before:
        parser.feed_eof()
    assert before.value.before_response is True
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    with pytest.raises(ServerDisconnected) as within:
        parser.feed_eof()
    assert within.value.before_response is False
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200")  # part of a head: the request may have been processed
    with pytest.raises(ServerDisconnected) as head:
        parser.feed_eof()
    assert head.value.before_response is False
    parser = ResponseParser()
    assert parser.feed(OK) is not None
    with pytest.raises(ServerDisconnected, match="after the response"):
        parser.feed_eof()


# ---------------------------------------------------------------------- properties

FUZZ = settings(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the work tree
    max_examples=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
Outcome = tuple[int, str, dict[str, str], bytes] | str


def outcome(
    raw: bytes, cuts: list[int], *, eof: bool = True, stream: bool = False, **kw: object
) -> Outcome:
    """Feed ``raw`` cut at ``cuts`` (then EOF): the response's fields, or "error".

    ``stream``: the body is streamed (its pieces handed over, then the end): no piece
    before the final head, the head does not change once known, the response returned
    at the end has no body of its own. Anything raised but :class:`ProtocolError`
    fails the property."""
    pieces: list[bytes] = []
    if stream:
        kw = {"max_body": None, **kw, "on_body": pieces.append}
    parser = ResponseParser(**kw)  # type: ignore[arg-type]
    bounds = [0, *sorted({c % (len(raw) + 1) for c in cuts}), len(raw)]
    head: Head | None = None
    try:
        for start, end in itertools.pairwise(bounds):
            response = parser.feed(raw[start:end])
            if stream:
                assert parser.head is not None or not (pieces or response)
                assert head is None or parser.head is head
                head = parser.head
            if response is not None:
                break
        else:
            if not eof:
                return "incomplete"
            response = parser.feed_eof()
    except ProtocolError as exc:
        assert str(exc)
        return "error"
    assert isinstance(response, Response)
    assert 200 <= response.status <= 999 and isinstance(response.keep_alive, bool)
    assert all(name == name.lower() for name in response.headers)
    if stream:
        assert response.body == b"" and all(pieces) and parser.head is not None
        assert parser.head == Head(response.status, response.reason, response.headers)
        return response.status, response.reason, response.headers, b"".join(pieces)
    return response.status, response.reason, response.headers, response.body


def streamed(raw: bytes, cuts: list[int], **kw: object) -> Outcome:
    """:func:`outcome` with the body streamed."""
    return outcome(raw, cuts, stream=True, **kw)  # type: ignore[arg-type]


def test_a_streamed_body_is_handed_over_as_it_is_parsed() -> None:
    pieces: list[bytes] = []
    parser = ResponseParser(max_body=None, on_body=pieces.append)
    assert parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") is None
    assert parser.head == Head(200, "OK", {"transfer-encoding": "chunked"}) and pieces == []
    assert parser.feed(b"3\r\nabc\r\n2\r\nde") is None
    assert pieces == [b"abc", b"de"]
    response = parser.feed(b"\r\n0\r\n\r\n")
    assert response is not None and response.body == b"" and response.keep_alive


def test_streamed_framing_is_limited_between_pieces_of_the_body() -> None:
    """Whole, a response's framing is limited in total; streamed, a body of any size may
    come in many chunks, and only framing without body between them is refused."""
    many = b"".join(b"1\r\nz\r\n" for _ in range(400))  # 2,000 bytes of chunk lines
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + many + b"0\r\n\r\n"
    with pytest.raises(ProtocolError, match="framing"):
        feed_all(raw, max_head=1000, step=100)
    assert streamed(raw, list(range(0, len(raw), 100)), max_head=1000) == (
        200,
        "OK",
        {"transfer-encoding": "chunked"},
        b"z" * 400,
    )
    endless = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n4;x=" + b"y" * 3000
    assert streamed(endless, list(range(0, len(endless), 100)), max_head=1000) == "error"


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)


@FUZZ
@given(raw=st.binary(max_size=600), cuts=cuts)
@example(raw=b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok", cuts=[])
@example(raw=b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nok", cuts=[20, 33])
def test_arbitrary_bytes_are_a_response_or_a_protocol_error(raw: bytes, cuts: list[int]) -> None:
    whole = outcome(raw, [])
    assert outcome(raw, cuts) == whole
    assert streamed(raw, cuts) == whole
    assert outcome(raw, cuts, no_body=True) == outcome(raw, [], no_body=True)


# near-valid responses: the grammar, with some pieces wrong, then sometimes mutated
@st.composite
def mostly(draw: st.DrawFn, valid: list[bytes], wrong: st.SearchStrategy[bytes]) -> bytes:
    """A valid piece three times in four, else a wrong one."""
    return draw(wrong if draw(st.integers(0, 3)) == 3 else st.sampled_from(valid))


VERSIONS = mostly(
    [b"HTTP/1.1"], st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.x"])
)
STATUSES = mostly(
    [b"200", b"204", b"304", b"403", b"500", b"100", b"103"],
    st.sampled_from([b"101", b"099", b"20", b"2000"]),
)
NAMES = mostly(
    [b"Content-Length", b"Transfer-Encoding", b"Connection", b"ETag", b"x-amz-id-2"],
    st.one_of(st.sampled_from([b"Content Length", b"", b"X:Y"]), st.binary(max_size=8)),
)
VALUES = mostly(
    [b"0", b"5", b"chunked", b"gzip, chunked", b"chunked, gzip", b"close", b"keep-alive"],
    st.one_of(
        # U+00B2 and ARABIC-INDIC DIGIT THREE pass str.isdigit()
        st.sampled_from([b"\xb2", b"\xd9\xa3", b" 5 ", b"5, 5", b"-1", b"a\x00b", b"\xff"]),
        st.binary(max_size=8),
    ),
)
BODIES = mostly(
    [
        b"",
        b"hello",
        b"5\r\nhello\r\n0\r\n\r\n",
        b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n",
        b"0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    ],
    st.one_of(st.just(b"fffffffffffffffffff\r\n"), st.binary(max_size=40)),
)


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    raw = draw(VERSIONS) + b" " + draw(STATUSES)
    raw += draw(st.sampled_from([b" OK", b"", b" \xe9t\xe9"])) + b"\r\n"
    for _ in range(draw(st.integers(0, 4))):
        raw += draw(NAMES) + b": " + draw(VALUES) + b"\r\n"
    raw += b"\r\n" + draw(BODIES)
    if draw(st.booleans()):  # mutations: replace, insert or delete a byte
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(raw) - 1))
            byte = bytes([draw(st.integers(0, 255))])
            raw = draw(
                st.sampled_from(
                    [
                        raw[:at] + byte + raw[at + 1 :],
                        raw[:at] + byte + raw[at:],
                        raw[:at] + raw[at + 1 :],
                    ]
                )
            )
    return raw


@FUZZ
@given(raw=near_valid(), cuts=cuts)
def test_near_valid_responses_are_a_response_or_a_protocol_error(
    raw: bytes, cuts: list[int]
) -> None:
    whole = outcome(raw, [])
    assert outcome(raw, cuts) == whole
    assert outcome(raw, cuts, max_head=64, max_body=8) in ("error", whole)
    assert streamed(raw, cuts) == whole
    assert streamed(raw, cuts, max_head=64) in ("error", whole)


header_name = st.text("abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=12).filter(
    lambda n: n not in ("content-length", "transfer-encoding", "connection")
)
header_value = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=20
)


@FUZZ
@given(
    status=st.integers(200, 599),
    reason=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
    headers=st.dictionaries(header_name, header_value, max_size=5),
    body=st.binary(max_size=300),
    framing=st.sampled_from(["length", "chunked", "close"]),
    chunk=st.integers(1, 50),
    cuts=cuts,
)
def test_valid_responses_parse_to_what_was_sent(
    status: int,
    reason: str,
    headers: dict[str, str],
    body: bytes,
    framing: str,
    chunk: int,
    cuts: list[int],
) -> None:
    if status in (204, 304):
        body = b""
    head = {**headers}
    if framing == "length":
        head["content-length"] = str(len(body))
        wire = body
    elif framing == "chunked":
        head["transfer-encoding"] = "chunked"
        pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]
        wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:
        wire = body
    raw = f"HTTP/1.1 {status} {reason}\r\n".encode()
    raw += b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in head.items())
    raw += b"\r\n" + wire
    eof = framing == "close" and status not in (204, 304)
    assert outcome(raw, cuts, eof=eof) == (status, reason, head, body)
    assert streamed(raw, cuts, eof=eof) == (status, reason, head, body)


# ---------------------------------------------------------------------- requests


def test_request_encoding() -> None:
    pool = Pool("http://s3.example:8333", limit=1)
    data = pool._encode(
        "PUT", "/b/k%20x.mp3", {"Content-MD5": "abc==", "x-amz-meta-u": "é"}, b"BODY"
    )
    assert data == (
        b"PUT /b/k%20x.mp3 HTTP/1.1\r\nHost: s3.example:8333\r\nContent-Length: 4\r\n"
        b"Content-MD5: abc==\r\nx-amz-meta-u: \xc3\xa9\r\n\r\nBODY"
    )


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("PUT", "/k", {"x-amz-meta-a": "1\r\nInjected: yes"}),
        ("PUT", "/k", {"x-amz-meta-a": "1\nInjected: yes"}),
        ("PUT", "/k", {"Bad Name": "1"}),
        ("PUT", "/k", {"Host": "elsewhere"}),
        ("PUT", "/k", {"transfer-encoding": "chunked"}),
        ("PUT", "/k x HTTP/1.0\r\nA:", {}),
        ("P UT", "/k", {}),
        ("PUT", "http://other/k", {}),
        ("PUT", "/k\r\nInjected: yes", {}),
    ],
)
def test_requests_that_could_smuggle_are_refused(
    method: str, target: str, headers: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match=r"invalid|set by the client"):
        Pool("http://s3.example", limit=1)._encode(method, target, headers, b"")


@pytest.mark.parametrize(
    "origin", ["ftp://x", "http://", "http://x/path", "http://u:p@x", "http://x/?q=1"]
)
def test_pool_refuses_what_is_not_an_origin(origin: str) -> None:
    with pytest.raises(ValueError):
        Pool(origin)


def test_origin_of() -> None:
    assert origin_of("https://b.s3.amazonaws.com/k/x.mp3") == "https://b.s3.amazonaws.com"
    assert origin_of("http://127.0.0.1:8333/bucket/") == "http://127.0.0.1:8333"
