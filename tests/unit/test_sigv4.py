"""fileserver's SigV4 signer produces exactly botocore's signature for the same request."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from botocore import auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fileserver.s3_put import SigV4Signer

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
