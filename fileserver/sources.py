"""Which recording sources the worker may download from. No I/O.

``FILESERVER_ALLOWED_SOURCES`` is a comma list of entries:
``host`` (any port), ``host:port``, an IP address, or a CIDR network
(``10.0.0.0/8``, ``[::1]:8080`` for an IPv6 address with a port).

A URL is checked in two steps. :meth:`SourcePolicy.check` (before any lookup): only
``http``/``https``, no credentials, a plain ASCII host name or an IP address, and a
host/port some entry may allow. :meth:`SourcePolicy.check_resolved` (after the one
lookup the fetcher makes): *every* address of the name must be allowed, by a name
entry for that very name or by an IP/CIDR entry, and the fetcher then connects to a
checked address (no second lookup, so no DNS rebinding). Link-local, cloud-metadata
and unspecified addresses (:data:`ALWAYS_REFUSED`) are refused even when a CIDR or a
name entry would allow them, unless listed by exact address.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from fileserver.errors import ConfigError, PermanentError, Reason
from fileserver.logs import scrub

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_REFUSED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),  # link-local: AWS/GCP/Azure/OCI metadata, ECS
    ipaddress.ip_network("fe80::/10"),  # IPv6 link-local
    ipaddress.ip_network("fd00:ec2::/64"),  # AWS IPv6 metadata (::254), DNS, NTP
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
    ipaddress.ip_network("168.63.129.16/32"),  # Azure WireServer
    ipaddress.ip_network("192.0.0.192/32"),  # Oracle Cloud legacy metadata
    ipaddress.ip_network("0.0.0.0/8"),  # "this host": Linux connects 0.0.0.0 to itself
    ipaddress.ip_network("::/128"),  # unspecified, same
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")
DEFAULT_PORTS = {"http": 80, "https": 443}
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")
_HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?")


@dataclass(frozen=True)
class Source:
    """A download target that passed :meth:`SourcePolicy.check`.

    ``address`` is set when the URL's host is an IP address (already checked); a host
    name still needs :meth:`SourcePolicy.check_resolved` on its resolved addresses.
    """

    scheme: str
    host: str
    port: int
    url: str
    address: IPAddress | None = None
    target: str = "/"  # the request target: path and query, as written in the URL


@dataclass(frozen=True)
class _Entry:
    host: str | None
    network: IPNetwork | None
    port: int | None
    exact_ip: bool


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def display_url(url: str) -> str:
    """A URL fit for a log line or a dead-letter detail: bounded, no password, no controls."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", scrub(url[:200]))


def forbidden(url: str, why: str) -> PermanentError:
    """A ``source_forbidden`` error whose detail never carries a URL password."""
    return PermanentError(Reason.SOURCE_FORBIDDEN, f"{why}: {display_url(url)}")


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches through (6to4, NAT64, IPv4-compatible)."""
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _V4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def always_refused(address: IPAddress) -> bool:
    """Whether ``address`` is link-local / cloud metadata / unspecified (or embeds one)."""
    if any(address in bad for bad in ALWAYS_REFUSED):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        v4 = address.ipv4_mapped or _embedded_v4(address)
        return v4 is not None and any(v4 in bad for bad in ALWAYS_REFUSED)
    return False


def _parse_entry(raw: str) -> _Entry:
    text = raw.strip().lower()
    port: int | None = None
    host = text
    if text.startswith("["):  # [v6]:port or [v6]
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"FILESERVER_ALLOWED_SOURCES entry {raw!r} has no closing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ConfigError(f"FILESERVER_ALLOWED_SOURCES entry {raw!r} has a bad port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ConfigError(f"FILESERVER_ALLOWED_SOURCES entry {raw!r} has a bad port")
        port = int(port_text)
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"FILESERVER_ALLOWED_SOURCES entry {raw!r}: port out of range")
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        name = host.rstrip(".")
        if not _HOST_NAME.fullmatch(name):
            raise ConfigError(
                f"FILESERVER_ALLOWED_SOURCES entry {raw!r} is not a host name (ASCII letters, "
                "digits, '-', '.'; write internationalised names in punycode), IP or CIDR"
            ) from None
        return _Entry(host=name, network=None, port=port, exact_ip=False)
    return _Entry(host=None, network=network, port=port, exact_ip="/" not in host)


_DECISIONS_KEPT = 4096


@functools.lru_cache(maxsize=_DECISIONS_KEPT)
def _ip_address(host: str) -> IPAddress | None:
    """``host`` as an IP address, ``None`` when it is not one (kept: parsed per event)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class SourcePolicy:
    """Decides whether a URL may be fetched; raises ``source_forbidden`` otherwise."""

    def __init__(self, allowed: tuple[str, ...] | list[str]) -> None:
        self._entries = [_parse_entry(item) for item in allowed]
        # Decisions per (address, port, host): the policy never changes and a worker
        # meets few gateways, so each is worked out once (the CIDR and metadata checks
        # were a visible share of the worker's CPU per event). Bounded: cleared when full.
        self._decided: dict[tuple[IPAddress, int, str | None], bool] = {}

    @property
    def empty(self) -> bool:
        return not self._entries

    def check(self, url: str) -> Source:
        """The parsed target of ``url``, or ``PermanentError(source_forbidden)``.

        A host name that passes still needs :meth:`check_resolved` once resolved.
        """
        if _CONTROL_CHAR.search(url):  # urlsplit would drop tabs and line breaks silently
            raise forbidden(url, "URL contains control characters")
        try:
            parts: SplitResult = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise forbidden(url, f"not a valid URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise forbidden(url, f"scheme {scheme[:20] or '(none)'!r} is not http or https")
        if parts.username is not None or parts.password is not None:
            raise forbidden(url, "URLs with credentials are refused")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise forbidden(url, "URL has no host")
        port = port if port is not None else DEFAULT_PORTS[scheme]
        if port == 0:
            raise forbidden(url, "port 0 is not a valid port")
        address = _ip_address(host)
        if address is None and not _HOST_NAME.fullmatch(host):
            raise forbidden(url, "host is not an IP address nor an ASCII host name ([a-z0-9.-])")
        if address is not None:
            allowed = self.check_address(address, port)
        else:
            allowed = any(self._may_allow_name(entry, host, port) for entry in self._entries)
        if not allowed:
            raise forbidden(url, f"{host}:{port} is not in FILESERVER_ALLOWED_SOURCES")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Source(scheme=scheme, host=host, port=port, url=url, address=address, target=target)

    def check_resolved(self, source: Source, addresses: Iterable[IPAddress]) -> list[IPAddress]:
        """The addresses to connect to, if *every* one is allowed for ``source``; else raise."""
        checked: list[IPAddress] = []
        for address in addresses:
            if not self.check_address(address, source.port, source.host):
                raise forbidden(
                    source.url,
                    f"{source.host} resolves to {address}, which is not allowed on port "
                    f"{source.port} by FILESERVER_ALLOWED_SOURCES",
                )
            if address not in checked:
                checked.append(address)
        if not checked:
            raise forbidden(source.url, f"{source.host} resolved to no address")
        return checked

    def check_address(self, address: IPAddress, port: int, host: str | None = None) -> bool:
        """Whether ``address`` may be connected to on ``port`` (``host``: the name looked up)."""
        key = (address, port, host)
        decided = self._decided.get(key)
        if decided is None:
            if len(self._decided) >= _DECISIONS_KEPT:
                self._decided.clear()
            decided = self._decided[key] = self._check_address(address, port, host)
        return decided

    def _check_address(self, address: IPAddress, port: int, host: str | None) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
        refused = always_refused(address)
        for entry in self._entries:
            if entry.port is not None and entry.port != port:
                continue
            if entry.network is not None and address in entry.network:
                if refused and not entry.exact_ip:
                    continue
                return True
            if entry.host is not None and host is not None and entry.host == host and not refused:
                return True
        return False

    @staticmethod
    def _may_allow_name(entry: _Entry, host: str, port: int) -> bool:
        """Whether ``entry`` may allow ``host``: its own name, or any IP/CIDR (decided later)."""
        if entry.port is not None and entry.port != port:
            return False
        return entry.network is not None or entry.host == host
