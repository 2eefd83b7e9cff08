"""The hostile-source suite again, with every httpx client on the aiohttp transport
(``FILESERVER_HTTP_TRANSPORT=aiohttp``): the same checks must hold."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fileserver.aiohttp_transport import AiohttpTransport
from fileserver.errors import Reason, SourceUnavailable
from tests.integration import test_hostile_sources as suite
from tests.integration.test_hostile_sources import *  # noqa: F403  (re-run every test)

_init = httpx.AsyncClient.__init__


@pytest.fixture(autouse=True)
def aiohttp_transport(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Build every ``httpx.AsyncClient`` of the suite on :class:`AiohttpTransport`."""

    def init(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("transport") is None:
            kwargs["transport"] = AiohttpTransport(
                max_connections=16,
                connect_timeout_s=2,
                read_timeout_s=2,
                verify=kwargs.get("verify", True),
            )
        _init(self, *args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "__init__", init)
    yield


@pytest.mark.parametrize(  # type: ignore[no-redef]  # replaces the imported test
    ("behaviour", "te_and_length"),
    [
        pytest.param(suite.endless_chunked, False, id="endless-chunked"),
        pytest.param(suite.endless_until_close, False, id="endless-no-length"),
        pytest.param(
            suite.lying_length(1000, "chunked"), True, id="small-length-then-endless-chunked"
        ),
        pytest.param(suite.lying_length(10**15, "endless"), False, id="huge-length"),
    ],
)
async def test_endless_or_oversized_bodies_are_too_large(
    client: suite.Client,
    server: suite.HostileServer,
    tmp_path: Any,
    behaviour: Any,
    te_and_length: bool,
) -> None:
    """As with httpx, except that aiohttp refuses Transfer-Encoding next to
    Content-Length outright (h11 reads that body as chunked, so httpx ends with
    ``too_large``): retryable ``source_unavailable`` instead. Nothing is kept."""
    http, _sent = client
    server.routes["/a.mp3"] = behaviour
    fetcher = suite.make_fetcher(http, ["gw.test"], tmp_path)
    url = f"http://gw.test:{server.port}/a.mp3"
    if te_and_length:
        with pytest.raises(SourceUnavailable, match="Transfer-Encoding"):
            await suite.fetch(fetcher, url)
    else:
        detail = await suite.refused(fetcher, url, Reason.TOO_LARGE)
        assert "FILESERVER_MAX_FILE_BYTES" in detail
    assert list(tmp_path.iterdir()) == []
