"""Realistic sample recordings and a local HTTP server that serves them (dev stack, tests,
benchmark). Needs the ``lameenc`` wheel from the ``[dev]`` extra."""

from __future__ import annotations

import math
import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def make_mp3(
    duration_s: float = 3.0,
    *,
    sample_rate: int = 16000,
    channels: int = 1,
    bitrate_kbps: int = 24,
    vbr: bool = False,
    freq_hz: float = 440.0,
    id3: bool = False,
) -> bytes:
    """Encode a sine tone as MP3 (CBR by default, like Janus' 16 kHz mono recordings)."""
    import lameenc

    frames = int(duration_s * sample_rate)
    amplitude = 8000
    step = 2 * math.pi * freq_hz / sample_rate
    mono = [int(amplitude * math.sin(step * i)) for i in range(frames)]
    samples = [s for s in mono for _ in range(channels)]
    pcm = struct.pack(f"<{len(samples)}h", *samples)
    enc = lameenc.Encoder()
    enc.set_in_sample_rate(sample_rate)
    enc.set_channels(channels)
    enc.set_quality(7)
    if vbr:
        enc.set_vbr(4)
        enc.set_vbr_quality(4)
    else:
        enc.set_bit_rate(bitrate_kbps)
    data = bytes(enc.encode(pcm)) + bytes(enc.flush())
    return id3_tag("fileserver sample") + data if id3 else data


def id3_tag(title: str) -> bytes:
    """A minimal ID3v2.3 tag with a title frame."""
    text = b"\x00" + title.encode("latin-1")
    frame = b"TIT2" + struct.pack(">I", len(text)) + b"\x00\x00" + text
    size = len(frame)
    syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
    return b"ID3\x03\x00\x00" + syncsafe + frame


Responder = Callable[[BaseHTTPRequestHandler], bool]


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up (killed workers, timeouts) are normal here, not errors.

    The accept backlog is socketserver's 5 unless raised: a worker opening up to
    ``FILESERVER_CONCURRENCY`` connections at once would see some refused, which a real
    gateway's server (backlog in the hundreds) does not do.
    """

    request_queue_size = 1024

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


@dataclass
class SampleServer:
    """A threaded HTTP server on 127.0.0.1 serving in-memory files by path.

    ``files`` maps a path (``/room_1_user_14_1569569695.mp3``) to bytes; ``hooks`` may
    answer a request first (return ``True`` when they did), e.g. to fail with 503.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    hooks: list[Responder] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self, port: int = 0) -> SampleServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                owner.hits[path] = owner.hits.get(path, 0) + 1
                for hook in list(owner.hooks):
                    if hook(self):
                        return
                body = owner.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "audio/mpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _QuietServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> SampleServer:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def talk_event(
    url: str,
    *,
    uid: int | str = "14",
    grp_id: int | str = "1",
    timestamp: int | str = 1569569697,
    md5: str | None = "md5",
) -> dict[str, Any]:
    """A msg_type 1 record in the seed's format (ids and timestamp as strings)."""
    ptt: dict[str, Any] = {
        "uid": uid,
        "grp_id": grp_id,
        "timestamp": str(timestamp),
        "file_path": url,
    }
    if md5 is not None:
        ptt["md5"] = md5
    return {"msg_type": 1, "ip": "127.0.0.1", "ptt_msg": ptt}


SIGNAL_EVENT: dict[str, Any] = {
    "msg_type": 2,
    "ip": "127.0.0.1",
    "signal_msg": {
        "signal_type": 1,
        "create_group_resp": {"gid": 470, "group_name": "0929group1128", "dispatcher_id": 7},
        "res": {"code": 0, "msg": "command executed successfully"},
    },
}
QUALITY_EVENT: dict[str, Any] = {
    "msg_type": 3,
    "ip": "127.0.0.1",
    "quality_msg": {
        "user_id": 62,
        "user_status": 1,
        "in_link_quality": 100,
        "in_media_link_quality": 100,
        "out_link_quality": 100,
        "out_media_link_quality": 100,
        "rtt": 100,
    },
}
