"""The review page in a real browser: Debian's ``chromium``, headless, driven over the
Chrome DevTools Protocol (``--remote-debugging-port``, a websocket opened with aiohttp;
no Selenium, no downloaded browser).

``fileserver serve`` runs as a real process over a seeded database (Postgres) and
bucket (SeaweedFS). The page must load (its script allowed by its own CSP), list the
bursts of the talk group, play one from its presigned S3 URL and one through the
server's proxy (the audio element reports a duration close to the burst's), and play
the group in order (the next burst starts when one ends).

Chromium is required: without it this test fails, saying how to install it
(``apt-get install -y chromium``; ``FILESERVER_TEST_CHROMIUM`` names another binary).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fileserver.devstack.servers import free_port
from fileserver.serve.auth import token_hash
from tests.integration.test_serve import seed, stack_for

TOKEN = "review-page-test-token"
INSTALL_HINT = (
    "the review page test needs Debian's chromium: `apt-get install -y chromium` "
    "(or FILESERVER_TEST_CHROMIUM=/path/to/chrome)"
)
BURSTS = [(7, 101, 1.0), (7, 102, 2.0), (8, 300, 1.0), (7, 103, 1.5)]


def chromium_binary() -> str:
    configured = os.environ.get("FILESERVER_TEST_CHROMIUM")
    if configured:
        if not Path(configured).exists():
            pytest.fail(f"FILESERVER_TEST_CHROMIUM={configured}: no such file; {INSTALL_HINT}")
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"no chromium on PATH: {INSTALL_HINT}")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A headless chromium with its DevTools port; stopped (its whole group) after."""
    binary = chromium_binary()
    profile = tmp_path / "chromium-profile"
    log = tmp_path / "chromium.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # the test may run as root in a container
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--mute-audio",
                "--autoplay-policy=no-user-gesture-required",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield int(port_file.read_text().splitlines()[0]), log
    finally:
        _stop(proc)


class Cdp:
    """The DevTools protocol over one page's websocket: commands and collected events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        call_id = self.next_id
        await self.ws.send_json({"id": call_id, "method": method, "params": params or {}})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            if msg.get("id") == call_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg["result"]
                return result
            self.events.append(msg)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console(self) -> str:
        lines = []
        for e in self.events:
            if e.get("method") == "Runtime.consoleAPICalled":
                lines.append(" ".join(str(a.get("value")) for a in e["params"]["args"]))
            elif e.get("method") in ("Runtime.exceptionThrown", "Log.entryAdded"):
                lines.append(json.dumps(e["params"])[:500])
        return "\n".join(lines)

    async def wait_for(self, expression: str, what: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                status = await self.evaluate("document.getElementById('status')?.textContent")
                raise AssertionError(
                    f"timed out waiting for {what}; page status {status!r}; console:\n"
                    + self.console()
                )
            await asyncio.sleep(0.2)


@pytest.fixture
async def page(chromium: tuple[int, Path]) -> AsyncIterator[Cdp]:
    port, _ = chromium
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json(content_type=None)
        target = next(t for t in targets if t["type"] == "page")
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = Cdp(ws)
            for domain in ("Page", "Runtime", "Log"):
                await cdp.send(f"{domain}.enable")
            yield cdp


@pytest.fixture
def serve_process(
    seaweed: Any, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Any]]:
    """Seed the database and bucket, then run ``fileserver serve`` as a real process."""
    stack = stack_for(seaweed, database_url)
    for k, v in stack.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    seeded = asyncio.run(seed(stack, BURSTS))
    port = free_port()
    env = {
        **os.environ,
        **stack.env(),
        "FILESERVER_SERVE_TOKENS": token_hash(TOKEN),
        "FILESERVER_SERVE_PORT": str(port),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fileserver", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                import urllib.request

                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"fileserver serve did not become ready: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, seeded
        assert TOKEN not in log.read_text(), "the token reached serve's log"
    finally:
        _stop(proc)


async def test_the_review_page_lists_and_plays_a_talk_group(
    page: Cdp, serve_process: tuple[str, Any]
) -> None:
    url, seeded = serve_process
    group = seeded.groups[7]  # newest first; the page lists the first talk group, 7
    await page.send("Page.navigate", {"url": f"{url}/review#token={TOKEN}"})
    await page.wait_for(
        f"window.review && window.review.ready && "
        f"document.querySelectorAll('tr[data-burst]').length === {len(group)}",
        "the page to list talk group 7's bursts",
    )
    listed = await page.evaluate(
        "[...document.querySelectorAll('tr[data-burst]')].map(r => "
        "[Number(r.dataset.burst), r.children[1].textContent, r.children[2].textContent])"
    )
    assert [row[0] for row in listed] == list(reversed(group))  # oldest first
    assert [row[1] for row in listed] == ["101", "102", "103"]
    assert [row[2] for row in listed] == ["1.0 s", "2.0 s", "1.5 s"]
    bars = await page.evaluate("document.querySelectorAll('#timeline .burst').length")
    assert bars == len(group)
    assert await page.evaluate("location.hash") == ""  # the token left the address bar
    options = await page.evaluate(
        "[...document.querySelectorAll('#group option')].map(o => o.value)"
    )
    assert options == ["7", "8"]

    second = group[1]  # uid 102, 2.0 s
    played = await page.evaluate(f"window.review.play({second}, 's3')")
    assert played["via"] == "s3" and abs(played["duration"] - 2.0) < 0.3, played
    src = await page.evaluate("document.getElementById('player').currentSrc")
    assert "X-Amz-Signature" in src and src.startswith("http://127.0.0.1:")
    played = await page.evaluate(f"window.review.play({group[0]}, 'proxy')")
    assert played["via"] == "proxy" and abs(played["duration"] - 1.5) < 0.3, played
    assert (await page.evaluate("document.getElementById('player').currentSrc")).startswith("blob:")

    # in order: the oldest first, then the next one when it ends
    await page.evaluate("document.getElementById('player').pause()")
    await page.evaluate("document.getElementById('play-all').click()")
    await page.wait_for(
        "window.review.state.index === 0 && document.getElementById('player').currentTime > 0",
        "the first burst to play",
    )
    await page.wait_for(
        "window.review.state.index >= 1", "the second burst to start after the first", 20
    )
    problems = [
        e
        for e in page.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (
            e.get("method") == "Log.entryAdded"
            and e["params"]["entry"]["level"] == "error"
            and not e["params"]["entry"].get("url", "").endswith("/favicon.ico")
        )
    ]
    assert not problems, page.console()
