"""Which recording sources the worker may download from. No I/O.

``FILESERVER_ALLOWED_SOURCES`` is a comma list of entries:
``host`` (any port), ``host:port``, an IP address, or a CIDR network
(``10.0.0.0/8``, ``[::1]:8080`` for an IPv6 address with a port).
Only ``http`` and ``https`` are allowed, never a URL with credentials, and
link-local / cloud-metadata addresses are refused unless listed by exact address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from fileserver.errors import ConfigError, PermanentError, Reason

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ALWAYS_REFUSED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
)
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Source:
    """A checked download target."""

    scheme: str
    host: str
    port: int
    url: str


@dataclass(frozen=True)
class _Entry:
    host: str | None
    network: IPNetwork | None
    port: int | None
    exact_ip: bool


def _forbidden(url: str, why: str) -> PermanentError:
    return PermanentError(Reason.SOURCE_FORBIDDEN, f"{why}: {url[:200]}")


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
        if not host or "/" in host:
            raise ConfigError(f"FILESERVER_ALLOWED_SOURCES entry {raw!r} is not valid") from None
        return _Entry(host=host.rstrip("."), network=None, port=port, exact_ip=False)
    return _Entry(host=None, network=network, port=port, exact_ip="/" not in host)


class SourcePolicy:
    """Decides whether a URL may be fetched; raises ``source_forbidden`` otherwise."""

    def __init__(self, allowed: tuple[str, ...] | list[str]) -> None:
        self._entries = [_parse_entry(item) for item in allowed]

    @property
    def empty(self) -> bool:
        return not self._entries

    def check(self, url: str) -> Source:
        """Return the parsed target of ``url`` or raise ``PermanentError(source_forbidden)``."""
        try:
            parts: SplitResult = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise _forbidden(url, f"not a valid URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise _forbidden(url, f"scheme {scheme or '(none)'!r} is not http or https")
        if parts.username is not None or parts.password is not None:
            raise _forbidden(url, "URLs with credentials are refused")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise _forbidden(url, "URL has no host")
        port = port if port is not None else DEFAULT_PORTS[scheme]
        if not self._allowed(host, port):
            raise _forbidden(url, f"{host}:{port} is not in FILESERVER_ALLOWED_SOURCES")
        return Source(scheme=scheme, host=host, port=port, url=url)

    def check_address(self, address: IPAddress, port: int, host: str | None = None) -> bool:
        """Whether a resolved address may be connected to (host given for name entries)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
        for entry in self._entries:
            if entry.port is not None and entry.port != port:
                continue
            if entry.network is not None and address in entry.network:
                if any(address in bad for bad in _ALWAYS_REFUSED) and not entry.exact_ip:
                    continue
                return True
            if entry.host is not None and host is not None and entry.host == host:
                return not any(address in bad for bad in _ALWAYS_REFUSED)
        return False

    def _allowed(self, host: str, port: int) -> bool:
        try:
            address: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            return self.check_address(address, port)
        return any(
            entry.host == host and (entry.port is None or entry.port == port)
            for entry in self._entries
        )
