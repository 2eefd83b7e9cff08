"""A server that accepts the connection and then says nothing is a *read* timeout on
every wire: the connection was made, so the fetcher must not try the next address as if
it had not been (aiohttp's wire called it a ConnectTimeout with ``connect=True``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fileserver.wires import AiohttpWire, Http11Wire, WireError


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    held: list[asyncio.StreamWriter] = []

    async def accept(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)  # never answers

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/a.mp3"
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("wire_type", [AiohttpWire, Http11Wire], ids=["aiohttp", "http11"])
async def test_silence_after_connect_is_a_read_timeout(
    wire_type: type[AiohttpWire] | type[Http11Wire], silent_server: str
) -> None:
    wire = wire_type(max_connections=4, connect_timeout_s=5.0, read_timeout_s=0.5)
    try:
        with pytest.raises(WireError) as caught:
            await wire.get(silent_server, host_header="gw.test", sni_hostname=None)
    finally:
        await wire.aclose()
    assert caught.value.timeout and not caught.value.connect, caught.value
    assert caught.value.kind == "ReadTimeout"
