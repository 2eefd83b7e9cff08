"""fileserver's SigV4 signer produces exactly botocore's signature for the same request,
and signs the very Host header that is sent (default ports dropped, as botocore does)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore import auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fileserver.storage import http11
from fileserver.storage.s3_put import Http11Sender, S3Putter, SigV4Signer

NOW = datetime(2026, 11, 28, 3, 4, 5, tzinfo=UTC)


def botocore_headers(
    url: str, headers: dict[str, str], body: bytes, creds: Credentials, monkeypatch: Any
) -> dict[str, str]:
    monkeypatch.setattr(auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    request = AWSRequest("PUT", url, data=body, headers=dict(headers))
    auth.S3SigV4Auth(creds, "s3", "eu-west-1").add_auth(request)
    return {k.lower(): v for k, v in request.headers.items()}


@pytest.mark.parametrize("token", [None, "session-token-value"])
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8333/ptt-recordings/14/1234/2019/09/27/1569569600-abc.mp3",
        "https://ptt-recordings.s3.eu-west-1.amazonaws.com/1/2/x.mp3",
    ],
)
def test_signature_matches_botocore(url: str, token: str | None, monkeypatch: Any) -> None:
    body = b"\xff\xf3" * 4000
    headers = {
        "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==",
        "Content-Type": "audio/mpeg",
        "x-amz-meta-uid": "1234",
        "x-amz-meta-md5": "d41d8cd98f00b204e9800998ecf8427e",
    }
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    expected = botocore_headers(url, headers, body, creds, monkeypatch)
    ours = SigV4Signer("eu-west-1").sign(
        "PUT",
        url,
        headers,
        body,
        access_key=creds.access_key,
        secret_key=creds.secret_key,
        token=token,
        now=NOW,
    )
    got = {k.lower(): v for k, v in ours.items()}
    assert got["authorization"] == expected["authorization"]
    assert got["x-amz-date"] == expected["x-amz-date"] == "20261128T030405Z"
    assert got["x-amz-content-sha256"] == expected["x-amz-content-sha256"]
    assert got.get("x-amz-security-token") == token


def test_a_different_secret_or_day_changes_the_signature() -> None:
    signer = SigV4Signer("us-east-1")

    def sig(secret: str, now: datetime) -> str:
        h = signer.sign("PUT", "http://h/b/k", {}, b"x", access_key="A", secret_key=secret, now=now)
        return h["Authorization"].rsplit("Signature=", 1)[1]

    base = sig("s1", NOW)
    assert sig("s1", NOW) == base
    assert sig("s2", NOW) != base
    assert sig("s1", NOW.replace(day=29)) != base


# endpoint -> the Host botocore signs (and urllib3 / aiohttp send) for it
HOSTS = {
    "http://127.0.0.1:80": "127.0.0.1",
    "http://127.0.0.1": "127.0.0.1",
    "http://127.0.0.1:8333": "127.0.0.1:8333",
    "http://127.0.0.1:443": "127.0.0.1:443",
    "https://s3.example.com:443": "s3.example.com",
    "https://s3.example.com": "s3.example.com",
    "https://s3.example.com:80": "s3.example.com:80",
    "https://s3.example.com:8443": "s3.example.com:8443",
    "https://S3.Example.COM:443": "s3.example.com",
    "http://[::1]:80": "[::1]",
    "http://[::1]:9000": "[::1]:9000",
    "https://[2001:db8::5]:443": "[2001:db8::5]",
}


@pytest.mark.parametrize(("endpoint", "host"), HOSTS.items())
def test_host_header_is_botocores(endpoint: str, host: str) -> None:
    assert http11.host_header(endpoint + "/b/k.mp3") == host
    assert auth._host_from_url(endpoint + "/b/k.mp3") == host


@pytest.mark.parametrize("endpoint", HOSTS)
def test_signature_matches_botocore_with_and_without_ports(endpoint: str, monkeypatch: Any) -> None:
    """Default ports are not signed (botocore drops them), others are."""
    url = endpoint + "/ptt-recordings/1/2/x.mp3"
    creds = Credentials("AKIDEXAMPLE", "secret", None)
    headers = {"Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==", "Content-Type": "audio/mpeg"}
    expected = botocore_headers(url, headers, b"abc", creds, monkeypatch)
    ours = SigV4Signer("eu-west-1").sign(
        "PUT", url, headers, b"abc", access_key="AKIDEXAMPLE", secret_key="secret", now=NOW
    )
    assert ours["Host"] == HOSTS[endpoint]
    assert ours["Authorization"] == expected["authorization"]


def test_a_host_given_is_the_host_signed(monkeypatch: Any) -> None:
    url = "http://127.0.0.1:80/b/k.mp3"
    creds = Credentials("AK", "SK", None)
    for host in ("127.0.0.1", "127.0.0.1:80"):
        ours = SigV4Signer("eu-west-1").sign(
            "PUT", url, {"Host": host}, b"", access_key="AK", secret_key="SK", now=NOW
        )
        assert ours["Host"] == host
        expected = botocore_headers(url, {"Host": host}, b"", creds, monkeypatch)
        assert ours["Authorization"] == expected["authorization"]


@pytest.mark.parametrize("endpoint", HOSTS)
def test_putter_signs_the_host_the_http11_pool_sends(endpoint: str) -> None:
    """One value: the putter's signed Host is the pool's (aiohttp sends the one given)."""
    prefix = endpoint + "/b/"
    putter = S3Putter(
        Http11Sender(http11.Pool(endpoint), timeout_s=1),
        prefix=prefix,
        bucket="b",
        credentials=Credentials("AK", "SK"),
        region="eu-west-1",
    )
    signed = putter.signed_headers(
        prefix + "k.mp3",
        b"x",
        "9dd4e461268c8034f5c8564e155c67a6",
        "audio/mpeg",
        {},
        credentials=Credentials("AK", "SK").get_frozen_credentials(),
    )
    assert signed["Host"] == http11.Pool(endpoint).host_header == HOSTS[endpoint]
    assert "SignedHeaders=content-md5;content-type;host;" in signed["Authorization"]


async def test_http11_sender_refuses_a_host_it_would_not_send() -> None:
    pool = http11.Pool("http://127.0.0.1:80")
    sender = Http11Sender(pool, timeout_s=1)
    with pytest.raises(
        ValueError, match=re.escape("signed Host '127.0.0.1:80' but the pool sends '127.0.0.1'")
    ):
        await sender.put("http://127.0.0.1:80/b/k", {"Host": "127.0.0.1:80"}, b"")
    await sender.aclose()
