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
                target="/room_1_user_14_1569569695.mp3",
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
        # a host-name entry does not allow its address (an IP entry may allow a name
        # whose addresses it covers: see test_check_resolved)
        (["localhost"], "http://127.0.0.1/a", "not in"),
        (["127.0.0.1:8080"], "http://localhost/a", "not in"),
        (["gw.example"], "http://other.example/a", "not in"),
        # host names other than plain ASCII (punycode is fine), before any lookup
        (["0.0.0.0/0"], "http://%31%32%37.0.0.1/a", "ASCII host name"),
        (["0.0.0.0/0"], "http://ex\u0430mple.com/a", "ASCII host name"),
        (["0.0.0.0/0"], "http://exa mple.com/a", "ASCII host name"),
        (["0.0.0.0/0"], "http://-evil.example/a", "ASCII host name"),
        (["0.0.0.0/0"], "http://" + "a" * 254 + "/x", "ASCII host name"),
        (["0.0.0.0/0"], "http://10.0.0.1:0/a", "port 0"),
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
        (["::/0"], "http://[fe80::1%25eth0]/", "not in"),
        (["::/0"], "http://[fd00:ec2::254]/latest/meta-data/", "not in"),
        (["::/0"], "http://[fd00:ec2::253]/", "not in"),
        (["0.0.0.0/0"], "http://168.63.129.16/machine", "not in"),
        (["0.0.0.0/0"], "http://192.0.0.192/", "not in"),
        (["0.0.0.0/0"], "http://0.0.0.0:8080/", "not in"),
        (["::/0"], "http://[::]:8080/", "not in"),
        # IPv6 spellings that reach the metadata address over IPv4 (NAT64, 6to4, compat)
        (["::/0"], "http://[64:ff9b::a9fe:a9fe]/latest/", "not in"),
        (["::/0"], "http://[2002:a9fe:a9fe::1]/latest/", "not in"),
        (["::/0"], "http://[::a9fe:a9fe]/latest/", "not in"),
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
        ([], "http://127.0.0.1/a.mp3", "not in"),
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


@pytest.mark.parametrize(
    ("allowed", "url", "addresses", "expected"),
    [
        # a name entry allows the name, whatever ordinary addresses it has
        (["gw.example"], "http://gw.example/a", ["203.0.113.5", "2001:db8::5"], True),
        (["gw.example"], "http://gw.example/a", ["127.0.0.1"], True),
        # ... but never a metadata / link-local / unspecified address, in any spelling
        (["gw.example"], "http://gw.example/a", ["203.0.113.5", "169.254.169.254"], False),
        (["gw.example"], "http://gw.example/a", ["::ffff:169.254.169.254"], False),
        (["gw.example"], "http://gw.example/a", ["64:ff9b::a9fe:a9fe"], False),
        (["gw.example"], "http://gw.example/a", ["fd00:ec2::254"], False),
        (["gw.example"], "http://gw.example/a", ["0.0.0.0"], False),
        # unless that exact address is listed too
        (["gw.example", "169.254.169.254"], "http://gw.example/a", ["169.254.169.254"], True),
        # IP / CIDR entries allow a name only when *every* address is covered
        (["127.0.0.0/8"], "http://gw.example/a", ["127.0.0.1"], True),
        (["127.0.0.1"], "http://localhost/a", ["127.0.0.1"], True),
        (["127.0.0.1"], "http://localhost/a", ["127.0.0.1", "::1"], False),
        (["127.0.0.0/8"], "http://gw.example/a", ["127.0.0.1", "10.0.0.1"], False),
        (["0.0.0.0/0"], "http://evil.example/a", ["169.254.169.254"], False),
        (["169.254.0.0/16"], "http://evil.example/a", ["169.254.169.254"], False),
        (["0.0.0.0/0", "::/0"], "http://evil.example/a", ["::ffff:a9fe:a9fe"], False),
        # ports still apply
        (["127.0.0.0/8:8080"], "http://gw.example:8080/a", ["127.0.0.1"], True),
        (["127.0.0.0/8:8080", "gw.example:9090"], "http://gw.example:9090/a", ["10.1.1.1"], True),
        # a name that resolves to nothing is refused
        (["gw.example"], "http://gw.example/a", [], False),
    ],
)
def test_check_resolved(allowed: list[str], url: str, addresses: list[str], expected: bool) -> None:
    policy = SourcePolicy(allowed)
    source = policy.check(url)
    assert source.address is None
    resolved = [ipaddress.ip_address(a) for a in addresses]
    if expected:
        assert policy.check_resolved(source, resolved + resolved) == resolved  # deduplicated
    else:
        with pytest.raises(PermanentError) as info:
            policy.check_resolved(source, resolved)
        assert info.value.reason is Reason.SOURCE_FORBIDDEN
        assert source.host in info.value.detail


def test_an_ip_host_is_checked_once_and_carried() -> None:
    source = SourcePolicy(["10.0.0.0/8"]).check("http://10.1.2.3:8080/a")
    assert source.address == ipaddress.ip_address("10.1.2.3")


def test_refusal_detail_never_carries_a_url_password() -> None:
    with pytest.raises(PermanentError) as info:
        SourcePolicy(["gw.example"]).check("https://admin:hunter2secret@gw.example/a.mp3")
    assert "hunter2secret" not in str(info.value)
    assert "admin:***@gw.example" in info.value.detail


@pytest.mark.parametrize("entry", ["ex\u0430mple.com", "a b", "-x.example", "%31.example"])
def test_entry_host_names_must_be_ascii(entry: str) -> None:
    with pytest.raises(ConfigError, match="punycode"):
        SourcePolicy([entry])


@pytest.mark.parametrize(
    "url",
    ["ftp://evil\r\nforged log line", "gopher://x/\x00\x1b[31mred", "file:///\x85\x7f"],
)
def test_refusal_detail_has_no_control_characters(url: str) -> None:
    with pytest.raises(PermanentError) as info:
        SourcePolicy(["0.0.0.0/0"]).check(url)
    detail = info.value.detail
    assert detail.isprintable() and "\\x" in detail


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://gw.test/a.mp3", "/a.mp3"),
        ("http://gw.test", "/"),
        ("http://gw.test/a.mp3?sig=1&x=%20#frag", "/a.mp3?sig=1&x=%20"),
        ("http://gw.test//evil.test/a@b.mp3", "//evil.test/a@b.mp3"),
    ],
)
def test_the_request_target_is_path_and_query_without_fragment(url: str, target: str) -> None:
    assert SourcePolicy(["gw.test"]).check(url).target == target


@pytest.mark.parametrize("char", ["\t", "\r", "\n", "\x00", "\x7f"])
def test_control_characters_anywhere_are_refused(char: str) -> None:
    """urlsplit would silently drop tabs and line breaks: refuse instead of guessing."""
    for url in (f"http://gw.test/a{char}b.mp3", f"http://gw{char}.test/a.mp3"):
        with pytest.raises(PermanentError, match="control characters"):
            SourcePolicy(["gw.test"]).check(url)


def test_kept_decisions_stay_per_port_and_name_and_bounded() -> None:
    """Decisions are kept per (address, port, name): one allowed on one port or for one
    name is not reused for another, and the store is cleared when full."""
    import ipaddress

    from fileserver import sources

    policy = SourcePolicy(["10.0.0.0/8:8080", "gw.test", "169.254.169.254"])
    gw = ipaddress.ip_address("10.1.2.3")
    assert policy.check_address(gw, 8080) and not policy.check_address(gw, 8081)
    meta = ipaddress.ip_address("169.254.169.254")
    assert policy.check_address(meta, 80)  # listed by exact address
    assert not policy.check_address(ipaddress.ip_address("169.254.1.1"), 80, "gw.test")
    for i in range(sources._DECISIONS_KEPT + 10):
        policy.check(f"http://10.0.{i // 250}.{i % 250}:8080/a.mp3")
    assert len(policy._decided) <= sources._DECISIONS_KEPT
    assert policy.check_address(gw, 8080) and not policy.check_address(gw, 8081)
    with pytest.raises(PermanentError, match="not in FILESERVER_ALLOWED_SOURCES"):
        policy.check("http://10.1.2.3:8081/a.mp3")
