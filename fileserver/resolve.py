"""Host-name resolution for the fetcher: one lookup per hop, whose addresses are checked
by the :class:`~fileserver.sources.SourcePolicy` and then connected to directly."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence

from fileserver.sources import IPAddress

Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]
"""``await resolver(host, port)`` -> the addresses of ``host`` (raises ``OSError``)."""


async def system_resolver(host: str, port: int) -> list[IPAddress]:
    """The addresses of ``host`` from the system resolver (``getaddrinfo``), in its order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out: list[IPAddress] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in out:
            out.append(address)
    return out


def static_resolver(table: Mapping[str, Sequence[str]]) -> Resolver:
    """A resolver answering from ``table`` (name -> addresses); other names do not exist."""
    parsed = {
        name.lower(): [ipaddress.ip_address(a) for a in addresses]
        for name, addresses in table.items()
    }

    async def resolve(host: str, port: int) -> list[IPAddress]:
        try:
            return list(parsed[host.lower()])
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: name not known") from None

    return resolve
