"""SourcePolicy: which recording URLs may be fetched."""

from __future__ import annotations

import ipaddress

import pytest

from fileserver.errors import ConfigError, PermanentError, Reason
from fileserver.sources import Source, SourcePolicy


@pytest.mark.parametrize(
    ("allowed", "url", "expected"),
    [
        # by host name, any port
        (
            ["dev.yunptt.com"],
            "https://dev.yunptt.com:9666/room_1_user_14_1569569695.mp3",
            Source(
                "https",
                "dev.yunptt.com",
                9666,
                "https://dev.yunptt.com:9666/room_1_user_14_1569569695.mp3",
            ),
        ),
        (["dev.yunptt.com"], "http://dev.yunptt.com/a.mp3", ("http", "dev.yunptt.com", 80)),
        (["dev.yunptt.com"], "https://dev.yunptt.com/a.mp3", ("https", "dev.yunptt.com", 443)),
        (["DEV.YunPTT.com"], "HTTPS://Dev.YUNPTT.com./a.mp3", ("https", "dev.yunptt.com", 443)),
        (["dev.yunptt.com."], "https://dev.yunptt.com/a.mp3", ("https", "dev.yunptt.com", 443)),
        # host:port
        (
            ["dev.yunptt.com:9666"],
            "https://dev.yunptt.com:9666/a",
            ("https", "dev.yunptt.com", 9666),
        ),
        ([" dev.yunptt.com:443 "], "https://dev.yunptt.com/a", ("https", "dev.yunptt.com", 443)),
        # IP address, IP:port
        (["10.1.2.3"], "http://10.1.2.3:8080/a.mp3", ("http", "10.1.2.3", 8080)),
        (["10.1.2.3:8080"], "http://10.1.2.3:8080/a.mp3", ("http", "10.1.2.3", 8080)),
        # CIDR
        (["10.0.0.0/8"], "http://10.200.3.4/a.mp3", ("http", "10.200.3.4", 80)),
        (["192.168.1.0/24:9666"], "https://192.168.1.77:9666/a", ("https", "192.168.1.77", 9666)),
        (["0.0.0.0/0"], "http://8.8.8.8/a.mp3", ("http", "8.8.8.8", 80)),
        # IPv6, with and without port, and CIDR
        (["::1"], "http://[::1]:8080/a.mp3", ("http", "::1", 8080)),
        (["[::1]"], "http://[::1]/a.mp3", ("http", "::1", 80)),
        (["[::1]:8080"], "http://[::1]:8080/a.mp3", ("http", "::1", 8080)),
        (["2001:db8::/32"], "https://[2001:db8::5]/a", ("https", "2001:db8::5", 443)),
        # metadata addresses listed by exact address
        (["169.254.169.254"], "http://169.254.169.254/latest", ("http", "169.254.169.254", 80)),
        (["169.254.169.254:80"], "http://169.254.169.254/x", ("http", "169.254.169.254", 80)),
        (["100.100.100.200"], "http://100.100.100.200/x", ("http", "100.100.100.200", 80)),
        # several entries: any may match
        (["a.example", "b.example:81"], "http://b.example:81/x", ("http", "b.example", 81)),
    ],
)
def test_allowed(allowed: list[str], url: str, expected: Source | tuple[str, str, int]) -> None:
    source = SourcePolicy(allowed).check(url)
    if isinstance(expected, Source):
        assert source == expected
    else:
        assert (source.scheme, source.host, source.port) == expected
        assert source.url == url


@pytest.mark.parametrize(
    ("allowed", "url", "why"),
    [
        # other host
        (["dev.yunptt.com"], "https://evil.example/a.mp3", "not in FILESERVER_ALLOWED_SOURCES"),
        (["dev.yunptt.com"], "https://dev.yunptt.com.evil.example/a", "not in"),
        (["dev.yunptt.com"], "https://x.dev.yunptt.com/a", "not in"),
        (["yunptt.com"], "https://dev.yunptt.com/a", "not in"),
        # other port
        (["dev.yunptt.com:9666"], "https://dev.yunptt.com:9667/a", "not in"),
        (["dev.yunptt.com:9666"], "https://dev.yunptt.com/a", "not in"),
        (["10.1.2.3:8080"], "http://10.1.2.3/a", "not in"),
        (["[::1]:8080"], "http://[::1]:8081/a", "not in"),
        # other address / network
        (["10.1.2.3"], "http://10.1.2.4/a", "not in"),
        (["10.0.0.0/8"], "http://11.0.0.1/a", "not in"),
        (["::1"], "http://[::2]/a", "not in"),
        (["0.0.0.0/0"], "http://[::1]/a", "not in"),
        # the allowed host name does not allow its address nor vice versa
        (["localhost"], "http://127.0.0.1/a", "not in"),
        (["127.0.0.1"], "http://localhost/a", "not in"),
        # schemes
        (["0.0.0.0/0", "dev.yunptt.com"], "file:///etc/passwd", "scheme"),
        (["dev.yunptt.com"], "ftp://dev.yunptt.com/a.mp3", "scheme"),
        (["dev.yunptt.com"], "gopher://dev.yunptt.com:70/_a", "scheme"),
        (["dev.yunptt.com"], "dev.yunptt.com/a.mp3", "scheme"),
        (["dev.yunptt.com"], "//dev.yunptt.com/a.mp3", "scheme"),
        (["dev.yunptt.com"], "javascript:alert(1)", "scheme"),
        # credentials
        (["dev.yunptt.com"], "https://user:pass@dev.yunptt.com/a.mp3", "credentials"),
        (["dev.yunptt.com"], "https://user@dev.yunptt.com/a.mp3", "credentials"),
        (["dev.yunptt.com"], "https://:pass@dev.yunptt.com/a.mp3", "credentials"),
        (["evil.example"], "https://dev.yunptt.com@evil.example/a", "credentials"),
        # link-local / cloud metadata, even when everything is allowed
        (["0.0.0.0/0"], "http://169.254.169.254/latest/meta-data/", "not in"),
        (["169.254.0.0/16"], "http://169.254.169.254/latest/meta-data/", "not in"),
        (["0.0.0.0/0"], "http://169.254.1.1/", "not in"),
        (["0.0.0.0/0"], "http://100.100.100.200/latest/meta-data/", "not in"),
        (["::/0"], "http://[fe80::1]/", "not in"),
        (["::/0"], "http://[fd00:ec2::254]/latest/meta-data/", "not in"),
        (["169.254.169.254:80"], "http://169.254.169.254:8080/", "not in"),
        (["169.254.169.254"], "http://169.254.169.253/", "not in"),
        # IPv4-mapped IPv6 spelling of the metadata address
        (["0.0.0.0/0", "::/0"], "http://[::ffff:169.254.169.254]/latest/meta-data/", "not in"),
        (["0.0.0.0/0", "::/0"], "http://[::ffff:a9fe:a9fe]/latest/meta-data/", "not in"),
        # missing host / broken URLs
        (["0.0.0.0/0"], "http:///a.mp3", "no host"),
        (["0.0.0.0/0"], "http://:80/a.mp3", "no host"),
        (["0.0.0.0/0"], "https://", "no host"),
        (["0.0.0.0/0"], "http://10.0.0.1:99999/a", "not a valid URL"),
        (["0.0.0.0/0"], "http://10.0.0.1:port/a", "not a valid URL"),
        (["::/0"], "http://[::1/a", "not a valid URL"),
        # nothing allowed
        ([], "https://dev.yunptt.com/a.mp3", "not in"),
    ],
)
def test_refused(allowed: list[str], url: str, why: str) -> None:
    with pytest.raises(PermanentError) as info:
        SourcePolicy(allowed).check(url)
    assert info.value.reason is Reason.SOURCE_FORBIDDEN
    assert why in info.value.detail


def test_refusal_detail_is_bounded() -> None:
    url = "https://evil.example/" + "a" * 10_000
    with pytest.raises(PermanentError) as info:
        SourcePolicy(["dev.yunptt.com"]).check(url)
    assert len(info.value.detail) < 400


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "   ",
        "host:",
        "host:abc",
        "host:0",
        "host:65536",
        "host:-1",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[::1]:abc",
        "[::1]:70000",
        "10.0.0.0/33",
        "10.0.0.0/x",
        "a/b",
        "/8",
    ],
)
def test_bad_config_entry(entry: str) -> None:
    with pytest.raises(ConfigError, match="FILESERVER_ALLOWED_SOURCES"):
        SourcePolicy(["dev.yunptt.com", entry])


@pytest.mark.parametrize(("allowed", "empty"), [([], True), ((), True), (["a.example"], False)])
def test_empty(allowed: list[str], empty: bool) -> None:
    assert SourcePolicy(allowed).empty is empty


@pytest.mark.parametrize(
    ("allowed", "address", "port", "host", "expected"),
    [
        (["10.0.0.0/8"], "10.1.1.1", 80, None, True),
        (["10.0.0.0/8:8080"], "10.1.1.1", 80, None, False),
        (["0.0.0.0/0"], "169.254.169.254", 80, None, False),
        (["169.254.169.254"], "169.254.169.254", 80, None, True),
        # a host-name entry allows what that name resolves to, except metadata addresses
        (["dev.yunptt.com"], "203.0.113.5", 443, "dev.yunptt.com", True),
        (["dev.yunptt.com"], "203.0.113.5", 443, "other.example", False),
        (["dev.yunptt.com"], "203.0.113.5", 443, None, False),
        (["dev.yunptt.com"], "169.254.169.254", 443, "dev.yunptt.com", False),
        (["dev.yunptt.com"], "fe80::1", 443, "dev.yunptt.com", False),
        (["dev.yunptt.com:9666"], "203.0.113.5", 443, "dev.yunptt.com", False),
        (["::/0"], "::ffff:169.254.169.254", 80, None, False),
    ],
)
def test_check_address(
    allowed: list[str], address: str, port: int, host: str | None, expected: bool
) -> None:
    policy = SourcePolicy(allowed)
    assert policy.check_address(ipaddress.ip_address(address), port, host) is expected
