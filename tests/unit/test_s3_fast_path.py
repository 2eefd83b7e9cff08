"""The event-loop S3 PUT path's edges, without a network: proxies from the environment
(the fast paths refuse to start where botocore would use one) and the parsing of S3
error answers (any bytes at all)."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fileserver.errors import ConfigError
from fileserver.runtime import make_s3_client, make_s3_putter
from fileserver.settings import Settings
from fileserver.storage.base import S3ErrorResponse
from fileserver.storage.s3_put import environment_proxy, error_response, object_url_prefix

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
PROXY_VARIABLES += ("ALL_PROXY", "all_proxy", "REQUEST_METHOD")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable but those the test sets."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def build(endpoint: str | None, transport: str = "http11", region: str = "eu-west-1") -> Any:
    """make_s3_putter as the runtime calls it; the client, for comparison."""
    s = Settings(
        s3_endpoint_url=endpoint, s3_region=region, s3_bucket="rec", s3_transport=transport
    )
    session = boto3.session.Session(aws_access_key_id="AK", aws_secret_access_key="SK")
    client = make_s3_client(s, session)
    return s, client, session


def botocore_proxy(client: Any, url: str) -> str | None:
    """The proxy botocore's own HTTP session picks for ``url`` (its private API: the
    reference the fast path's decision is checked against)."""
    proxy: str | None = client._endpoint.http_session._proxy_config.proxy_url_for(url)
    return proxy


CASES = [
    # endpoint, environment, proxied?
    ("https://s3.example.com", {"HTTPS_PROXY": "http://proxy:3128"}, True),
    ("https://s3.example.com", {"https_proxy": "http://proxy:3128"}, True),
    ("https://s3.example.com", {"HTTP_PROXY": "http://proxy:3128"}, False),  # other scheme
    ("http://s3.example.com:8333", {"HTTP_PROXY": "http://proxy:3128"}, True),
    ("https://s3.example.com", {"ALL_PROXY": "http://proxy:3128"}, False),  # botocore ignores
    ("https://s3.example.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "s3.example.com"}, False),
    ("https://s3.example.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"}, False),
    ("https://s3.example.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.com"}, False),
    ("https://s3.example.com", {"HTTPS_PROXY": "http://p:1", "no_proxy": "*"}, False),
    ("https://s3.example.com", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "other.org"}, True),
    ("http://127.0.0.1:8333", {"HTTP_PROXY": "http://p:1", "NO_PROXY": "127.0.0.1"}, False),
    ("http://127.0.0.1:8333", {"HTTP_PROXY": "http://p:1"}, True),
    (None, {"HTTPS_PROXY": "http://p:1"}, True),  # AWS itself
    (None, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".amazonaws.com"}, False),
    ("https://s3.example.com", {}, False),
]


@pytest.mark.parametrize(("endpoint", "variables", "proxied"), CASES)
def test_the_fast_path_sees_a_proxy_exactly_where_botocore_uses_one(
    env: pytest.MonkeyPatch, endpoint: str | None, variables: dict[str, str], proxied: bool
) -> None:
    for name, value in variables.items():
        env.setenv(name, value)
    _s, client, _session = build(endpoint)
    url = object_url_prefix(client, "rec")
    assert environment_proxy(client, url) == botocore_proxy(client, url)
    assert (environment_proxy(client, url) is not None) is proxied


@pytest.mark.parametrize("transport", ["http11", "aiohttp"])
def test_a_fast_path_refuses_to_start_behind_a_proxy_and_says_what_to_change(
    env: pytest.MonkeyPatch, transport: str
) -> None:
    env.setenv("HTTPS_PROXY", "http://user:secret@proxy.corp:3128")
    s, client, session = build("https://s3.example.com", transport)
    with pytest.raises(ConfigError) as info:
        make_s3_putter(s, client, session)
    message = str(info.value)
    assert "HTTPS_PROXY=http://user:***@proxy.corp:3128" in message
    assert "secret" not in message
    assert "https://s3.example.com" in message
    assert f"FILESERVER_S3_TRANSPORT={transport} connects directly" in message
    assert "set FILESERVER_S3_TRANSPORT=boto3" in message
    assert "add s3.example.com to NO_PROXY" in message


def test_the_variable_named_is_the_one_set(env: pytest.MonkeyPatch) -> None:
    env.setenv("http_proxy", "http://proxy.corp:3128")
    s, client, session = build("http://127.0.0.1:8333")
    with pytest.raises(ConfigError, match=r"^http_proxy=http://proxy\.corp:3128 applies"):
        make_s3_putter(s, client, session)


async def test_no_proxy_that_applies_builds_the_putter(env: pytest.MonkeyPatch) -> None:
    env.setenv("HTTPS_PROXY", "http://proxy.corp:3128")  # the endpoint is http
    env.setenv("NO_PROXY", "localhost")
    s, client, session = build("http://127.0.0.1:8333")
    putter = make_s3_putter(s, client, session)
    assert putter.prefix == "http://127.0.0.1:8333/rec/"
    await putter.sender.aclose()


# ------------------------------------------------------------------- error answers

FUZZ = settings(
    deadline=None,
    database=None,
    max_examples=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
XML = b"<?xml version='1.0'?><Error><Code>%s</Code><Message>%s</Message>%s</Error>"


@FUZZ
@given(status=st.integers(100, 599), reply=st.binary(max_size=600))
@example(status=400, reply=XML % (b"AuthorizationHeaderMalformed", b"wrong", b"<Region>x</Region>"))
@example(status=403, reply=b"<Code>\xff\xfe</Code>")
@example(status=500, reply=b"<Code></Code>")
def test_any_error_answer_is_an_s3_error_with_a_code(status: int, reply: bytes) -> None:
    error = error_response(status, reply, "rec")
    assert isinstance(error, S3ErrorResponse) and error.status == status
    assert error.code  # the XML's, else "HTTP <status>"
    assert str(error).startswith(f"s3: {error.code} on bucket 'rec': ")


def test_the_region_of_a_wrong_region_answer() -> None:
    reply = XML % (
        b"AuthorizationHeaderMalformed",
        b"The authorization header is malformed; the region 'us-east-1' is wrong; "
        b"expecting 'eu-central-1'",
        b"<Region>eu-central-1</Region><RequestId>R</RequestId>",
    )
    error = error_response(400, reply, "rec")
    assert (error.code, error.region, error.status) == (
        "AuthorizationHeaderMalformed",
        "eu-central-1",
        400,
    )
    assert "expecting 'eu-central-1'" in error.detail


def test_an_answer_without_a_code_is_named_by_its_status() -> None:
    error = error_response(301, b"", "rec")
    assert (error.code, error.region) == ("HTTP 301", "")
