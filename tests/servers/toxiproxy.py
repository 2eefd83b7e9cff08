"""Toxiproxy (Shopify's TCP fault proxy) for network-fault tests, built from the Go module proxy.

Fault tests need a real proxy between the worker and each server: latency, bandwidth
limits, blackholes, resets and cut links happen in a real TCP stream, not in a mock. No
release binary can be downloaded here, so ``go install`` builds
``github.com/Shopify/toxiproxy/v2/cmd/server`` once (~30 s) into
``~/.cache/fileserver/toxiproxy-<version>/server`` (or ``$FILESERVER_TOXIPROXY_BIN``) and
every later run reuses it. ``python -m tests.servers.toxiproxy --fetch`` does that ahead of
a test run.

:class:`Toxiproxy` and :class:`Proxy` are a small typed client over its HTTP API.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from fileserver.devstack.servers import LOOPBACK, ManagedServer, free_port

TOXIPROXY_VERSION = "2.12.0"
_MODULE = "github.com/Shopify/toxiproxy/v2"
_PACKAGE = f"{_MODULE}/cmd/server@v{TOXIPROXY_VERSION}"
_BUILD_TIMEOUT = 600.0

ToxicType = Literal[
    "latency", "bandwidth", "slow_close", "timeout", "reset_peer", "slicer", "limit_data"
]
Stream = Literal["downstream", "upstream"]


class ToxiproxyError(RuntimeError):
    """The Toxiproxy API refused a request (the message carries its answer)."""


# --------------------------------------------------------------------------- binary


def toxiproxy_binary_path() -> Path:
    """Where the server binary lives: ``$FILESERVER_TOXIPROXY_BIN`` or the user cache."""
    override = os.environ.get("FILESERVER_TOXIPROXY_BIN")
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fileserver" / f"toxiproxy-{TOXIPROXY_VERSION}" / "server"


def _ready(binary: Path) -> bool:
    return binary.is_file() and os.access(binary, os.X_OK)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Two pytest processes (or xdist workers) must not run `go install` into one place.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_toxiproxy() -> Path:
    """Build the Toxiproxy server with ``go install`` on first use; return the binary."""
    binary = toxiproxy_binary_path()
    if _ready(binary):
        return binary
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            f"Go (`go`) is needed to build Toxiproxy {TOXIPROXY_VERSION} from the module "
            f"proxy into {binary}: install Go >= 1.23, or set FILESERVER_TOXIPROXY_BIN to "
            "a toxiproxy-server binary"
        )
    with _file_lock(binary.parent / f".{binary.name}.lock"):
        if _ready(binary):
            return binary
        started = time.monotonic()
        print(f"building Toxiproxy {TOXIPROXY_VERSION} into {binary} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="toxiproxy-", dir=binary.parent) as tmp:
            # GOBIN is a private directory, so a half-written binary is never seen; the
            # -X flag makes `server -version` print the real version instead of "git".
            env = {**os.environ, "GOBIN": tmp, "CGO_ENABLED": "0"}
            ldflags = f"-s -w -X {_MODULE}.Version={TOXIPROXY_VERSION}"
            try:
                result = subprocess.run(
                    [go, "install", f"-ldflags={ldflags}", _PACKAGE],
                    cwd=tmp,  # outside any go.mod
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    check=False,
                    timeout=_BUILD_TIMEOUT,
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(
                    f"`go install {_PACKAGE}` did not finish in {_BUILD_TIMEOUT:.0f}s"
                ) from exc
            built = Path(tmp) / "server"
            if result.returncode != 0 or not _ready(built):
                raise RuntimeError(
                    f"`go install {_PACKAGE}` failed (exit code {result.returncode}):\n"
                    f"{result.stdout.strip()}"
                )
            built.replace(binary)
        print(f"built Toxiproxy in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return binary


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class Toxic:
    """One toxic as the API reports it."""

    name: str
    type: str
    stream: str
    toxicity: float
    attributes: dict[str, Any]

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Toxic:
        return cls(
            name=str(data["name"]),
            type=str(data["type"]),
            stream=str(data["stream"]),
            toxicity=float(data["toxicity"]),
            attributes=dict(data.get("attributes") or {}),
        )


def _check(response: httpx.Response) -> Any:
    """The JSON body of a successful answer; a ToxiproxyError naming the request otherwise."""
    if response.is_success:
        return response.json() if response.content else None
    try:
        detail = response.json().get("error", response.text)
    except ValueError:
        detail = response.text
    request = response.request
    raise ToxiproxyError(
        f"toxiproxy {request.method} {request.url.path}: {response.status_code} {detail}"
    )


@dataclass
class Proxy:
    """One proxy: clients connect to ``listen`` and reach ``upstream`` through the toxics."""

    api: Toxiproxy = field(repr=False)
    name: str
    listen: str
    upstream: str
    enabled: bool = True

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the listen address (for HTTP upstreams)."""
        return f"http://{self.listen}"

    def _path(self, *parts: str) -> str:
        return "/".join(["/proxies", self.name, *parts])

    def add_toxic(
        self,
        type: ToxicType,
        attributes: Mapping[str, Any] | None = None,
        *,
        stream: Stream = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
    ) -> Toxic:
        """Add a toxic (applies to open connections too); its name defaults to type_stream.

        ``downstream`` is upstream server -> client, ``upstream`` client -> server.
        """
        body: dict[str, Any] = {
            "type": type,
            "stream": stream,
            "toxicity": toxicity,
            "attributes": dict(attributes or {}),
        }
        if name is not None:
            body["name"] = name
        return Toxic.from_api(_check(self.api.http.post(self._path("toxics"), json=body)))

    def remove_toxic(self, name: str) -> None:
        """Remove a toxic. Removing a ``timeout`` toxic closes the connections it held."""
        _check(self.api.http.delete(self._path("toxics", name)))

    def toxics(self) -> list[Toxic]:
        return [Toxic.from_api(t) for t in _check(self.api.http.get(self._path("toxics")))]

    def clear_toxics(self) -> None:
        """Remove every toxic of this proxy."""
        for toxic in self.toxics():
            self.remove_toxic(toxic.name)

    @contextlib.contextmanager
    def toxic(
        self,
        type: ToxicType,
        attributes: Mapping[str, Any] | None = None,
        *,
        stream: Stream = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
    ) -> Iterator[Toxic]:
        """``with proxy.toxic("latency", {"latency": 500}):`` the toxic, removed on exit."""
        added = self.add_toxic(type, attributes, stream=stream, toxicity=toxicity, name=name)
        try:
            yield added
        finally:
            with contextlib.suppress(ToxiproxyError):  # already gone after a reset()
                self.remove_toxic(added.name)

    def _update(self, **changes: Any) -> None:
        data = _check(self.api.http.patch(self._path(), json=changes))
        self.enabled = bool(data["enabled"])
        self.listen = str(data["listen"])
        self.upstream = str(data["upstream"])

    def disable(self) -> None:
        """Cut the link: open connections are closed and new ones are refused."""
        self._update(enabled=False)

    def enable(self) -> None:
        """Listen again on the same address."""
        self._update(enabled=True)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The link cut for the duration of the block."""
        self.disable()
        try:
            yield
        finally:
            self.enable()

    def heal(self) -> None:
        """Enabled and without toxics again (the per-test clean-up of a shared proxy)."""
        self.clear_toxics()
        self.enable()  # a no-op when enabled; ``self.enabled`` may be stale after reset()

    def delete(self) -> None:
        """Remove the proxy (closes its connections and frees its port)."""
        _check(self.api.http.delete(self._path()))


class Toxiproxy:
    """A client of one Toxiproxy server's HTTP API (``http://127.0.0.1:PORT``)."""

    def __init__(
        self, api_url: str, *, timeout: float = 10.0, server: ToxiproxyServer | None = None
    ) -> None:
        self.api_url = api_url
        self.server = server  # set when we started the process (pid, log path)
        # The API answers only non-browser user agents; httpx's default one is fine.
        self.http = httpx.Client(base_url=api_url, timeout=timeout, trust_env=False)

    def version(self) -> str:
        """The server's version (``{"version": "2.12.0"}`` on the wire)."""
        return str(_check(self.http.get("/version"))["version"])

    def create_proxy(self, name: str, upstream: str, listen: str | int = f"{LOOPBACK}:0") -> Proxy:
        """A new enabled proxy; ``listen`` is ``host:port`` or a loopback port (0: any)."""
        if isinstance(listen, int):
            listen = f"{LOOPBACK}:{listen}"
        body = {"name": name, "upstream": upstream, "listen": listen, "enabled": True}
        return self._proxy(_check(self.http.post("/proxies", json=body)))

    def get_proxy(self, name: str) -> Proxy:
        return self._proxy(_check(self.http.get(f"/proxies/{name}")))

    def proxies(self) -> dict[str, Proxy]:
        return {n: self._proxy(p) for n, p in _check(self.http.get("/proxies")).items()}

    def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        _check(self.http.post("/reset"))

    def close(self) -> None:
        self.http.close()

    def _proxy(self, data: Mapping[str, Any]) -> Proxy:
        return Proxy(
            api=self,
            name=str(data["name"]),
            listen=str(data["listen"]),
            upstream=str(data["upstream"]),
            enabled=bool(data["enabled"]),
        )


# --------------------------------------------------------------------------- server


class ReservedPort:
    """A free loopback port held by a bound (not listening) socket until :meth:`release`.

    For a proxy address that must be known long before the proxy exists (the address a
    Kafka broker advertises): without SO_REUSEADDR nobody else can bind the port, and
    ``free_port`` elsewhere skips it, until the proxy is about to take it.
    """

    def __init__(self) -> None:
        for _ in range(20):
            port = free_port()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((LOOPBACK, port))
            except OSError:  # taken since free_port looked
                sock.close()
                continue
            self.port = port
            self.address = f"{LOOPBACK}:{port}"
            self._sock: socket.socket | None = sock
            return
        raise RuntimeError("could not reserve a free port on 127.0.0.1")

    def release(self) -> None:
        """Free the port (idempotent); bind it right after."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ReservedPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ToxiproxyServer(ManagedServer):
    """``toxiproxy-server`` with its API on a free loopback port (proxies come later)."""

    ready_timeout = 20.0
    stop_timeout = 5.0

    def __init__(self, workdir: Path, binary: Path) -> None:
        self.port = free_port()
        self.api_url = f"http://{LOOPBACK}:{self.port}"
        super().__init__(
            "toxiproxy",
            [str(binary), "-host", LOOPBACK, "-port", str(self.port)],
            workdir=workdir,
            # Its info log has a line per connection; warnings are what helps in a failure.
            env={**os.environ, "LOG_LEVEL": "warn"},
            ports=[self.port],
        )

    def probe(self) -> None:
        """Ready when ``GET /version`` answers."""
        response = httpx.get(f"{self.api_url}/version", timeout=2.0, trust_env=False)
        response.raise_for_status()


@contextlib.contextmanager
def start_toxiproxy(workdir: Path, *, ready_timeout: float | None = None) -> Iterator[Toxiproxy]:
    """Run a Toxiproxy server (building it if needed); yield its API client, then stop it.

    The handle's ``server`` is the :class:`ToxiproxyServer` (pid, log path); it is stopped
    by pid on exit, also when the block raises.
    """
    binary = ensure_toxiproxy()
    workdir.mkdir(parents=True, exist_ok=True)
    server = ToxiproxyServer(workdir, binary)
    try:
        server.start(ready_timeout)  # stops the process itself if it never gets ready
        client = Toxiproxy(server.api_url, server=server)
        try:
            yield client
        finally:
            client.close()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.servers.toxiproxy [--fetch] [--workdir DIR]``."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fetch", action="store_true", help="only build the binary, then exit")
    parser.add_argument("--workdir", type=Path, help="where the log goes (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.fetch:
        print(ensure_toxiproxy())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per readiness probe
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="toxiproxy-"))
    with start_toxiproxy(workdir) as api:
        print(f"Toxiproxy {api.version()} API at {api.api_url} (workdir {workdir})")
        print("Ctrl-C stops it.")
        with contextlib.suppress(KeyboardInterrupt):
            while api.server is not None and api.server.is_running():
                time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
