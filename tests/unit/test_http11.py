"""The HTTP/1.1 response parser and request encoder of fileserver.storage.http11 (no I/O)."""

from __future__ import annotations

import pytest

from fileserver.storage.http11 import (
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


def test_close_delimited_body_ends_at_eof_and_is_not_kept() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 500 Oops\r\n\r\npart one,") is None
    assert parser.feed(b" part two") is None
    response = parser.feed_eof()
    assert (response.status, response.body, response.keep_alive) == (
        500,
        b"part one, part two",
        False,
    )


def test_interim_responses_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    response = feed_all(raw, step=2)
    assert response is not None and response.status == 200 and response.body == b"hello"
    assert "link" not in response.headers


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
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nextra",  # bytes after the response
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0", "trailing-bytes", "both-framings"],
)
def test_responses_after_which_the_connection_is_not_reused(raw: bytes) -> None:
    response = feed_all(raw)
    assert response is not None and response.status == 200
    assert response.keep_alive is False


def test_repeated_headers_are_joined_and_names_lower_cased() -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a:  2 \r\nContent-Length: 0\r\n\r\n"
    response = feed_all(raw)
    assert response is not None and response.headers["x-a"] == "1, 2"


def test_the_same_content_length_repeated_is_accepted() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"
    response = feed_all(raw)
    assert response is not None and response.body == b"ok"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\n", "invalid header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "invalid chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n",
            "not followed by CRLF",
        ),
    ],
)
def test_malformed_responses_are_protocol_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        feed_all(raw)


def test_size_limits() -> None:
    with pytest.raises(ProtocolError, match="head over 100 bytes"):
        feed_all(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200, max_head=100)
    with pytest.raises(ProtocolError, match="body over 10 bytes"):
        feed_all(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", max_body=10)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n"
    with pytest.raises(ProtocolError, match="body over 10 bytes"):
        feed_all(chunked, max_body=10)
    with pytest.raises(ProtocolError, match="body over 10 bytes"):
        feed_all(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11, max_body=10)
    with pytest.raises(ProtocolError, match="chunk size line over"):
        feed_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0" * 2000)


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
