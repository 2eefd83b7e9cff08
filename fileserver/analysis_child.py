"""The analysis child process (``python -m fileserver.analysis_child``) and its framing.

:class:`fileserver.analyzer.Analyzer` runs :func:`fileserver.analysis.analyse` in
long-lived child processes (``FILESERVER_ANALYSIS_PROCESSES``), out of the worker's GIL:
in a thread of the worker the decoder's Python read callbacks each waited for the GIL
behind the busy event loop (``python -m bench.analysis_gil``: ~1,800 decodes/s beside an
idle main thread, ~6 beside a busy one).

The child reads requests on its stdin and answers each, in order, on its stdout. Every
message is one frame::

    !II (header length, body length) | header: a JSON object (UTF-8) | body

* a request's header: ``id``, ``config`` (the :class:`AnalysisConfig` fields),
  ``expected_ms`` (or null) and either nothing more (the recording is the body) or
  ``path``, a spooled download the child opens itself (the body is then empty);
* a reply's header: ``id``, ``cpu_s`` (the child's CPU seconds for this analysis,
  ``time.process_time``) and either ``analysis`` (the :class:`Analysis` fields) or
  ``error`` (why there is none); no body;
* before any reply, once it has imported what the analysis needs, the child says it is
  ready: a header ``{"ready": true}``, no body (:data:`READY`). A child that ends before
  it could not start (the worker backs off); one that ends after it was taken down by a
  recording (the worker fails that one burst and starts another child).

The child imports only what :func:`analyse` needs (numpy, miniaudio, webrtcvad: ~40 MB
peak RSS at work, ~0.25 s of CPU to start, measured), never faust, SQLAlchemy or boto3. It ignores
SIGINT and SIGTERM (a Ctrl-C or a signal to the process group must not kill it under a
worker that is still draining: the worker closes its stdin and kills it when it is done
with it) and, on Linux, asks to be killed with its parent (``PR_SET_PDEATHSIG``); a
closed stdin ends it too. Anything written to its own stdout by a library goes to stderr
instead: the real stdout carries only frames.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any, TypeVar

from fileserver.analysis import Analysis, AnalysisConfig, AnalysisError, analyse

PREFIX = struct.Struct("!II")
#: Larger headers are refused: a request's is ~250 bytes, a reply's ~300.
MAX_HEADER_BYTES = 64 * 1024
#: Larger bodies are refused: the worker sends at most ``FILESERVER_ANALYSIS_MAX_BYTES``.
MAX_BODY_BYTES = 1 << 30
#: Test-only: a child whose environment sets this treats an inline recording that starts
#: with these bytes as a decoder that never returns (it sleeps), so the tests can show
#: the worker kills it at the deadline. Nothing else reads it; ``FILESERVER_TEST_*`` is
#: the test suite's own namespace (no setting, never warned about).
HANG_MARKER_ENV = "FILESERVER_TEST_ANALYSIS_CHILD_HANG"
#: The header of the frame a child sends once, before its first reply: it has started.
READY: dict[str, Any] = {"ready": True}


class FrameError(ValueError):
    """A frame that is not what the protocol says (never a crash of the reader)."""


@dataclass(frozen=True)
class Request:
    """One recording to analyse; ``content`` is the bytes or the path of a spooled file."""

    id: int
    config: AnalysisConfig
    content: bytes | Path
    expected_ms: int | None = None


@dataclass(frozen=True)
class Reply:
    """The analysis of request ``id``, or the ``error`` that stopped it, and the child's
    CPU seconds for it."""

    id: int
    analysis: Analysis | None = None
    error: str | None = None
    cpu_s: float = 0.0


# ---------------------------------------------------------------------------- framing


def frame(header: dict[str, Any], body: bytes = b"") -> tuple[bytes, bytes]:
    """One frame: the prefix and ``header`` as compact JSON; ``body`` (apart: a recording
    is not copied to be sent)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return PREFIX.pack(len(head), len(body)) + head, body


def frame_lengths(prefix: bytes) -> tuple[int, int]:
    """The header and body lengths of a frame's :data:`PREFIX`, within the limits."""
    if len(prefix) != PREFIX.size:
        raise FrameError(f"a frame prefix is {PREFIX.size} bytes, got {len(prefix)}")
    head, body = PREFIX.unpack(prefix)
    if head > MAX_HEADER_BYTES or body > MAX_BODY_BYTES:
        raise FrameError(f"frame too large: header {head} bytes, body {body}")
    return head, body


def split_frame(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(header, body, the bytes after them) of the frame at the start of ``data``;
    ``None`` while it is incomplete."""
    if len(data) < PREFIX.size:
        return None
    head, body = frame_lengths(data[: PREFIX.size])
    end = PREFIX.size + head + body
    if len(data) < end:
        return None
    return data[PREFIX.size : PREFIX.size + head], data[PREFIX.size + head : end], data[end:]


def encode_request(request: Request) -> tuple[bytes, bytes]:
    """The frame of ``request`` (the recording inline, or its path): head and body."""
    header: dict[str, Any] = {
        "id": request.id,
        "config": _fields_of(request.config),
        "expected_ms": request.expected_ms,
    }
    if isinstance(request.content, Path):
        header["path"] = str(request.content)
        return frame(header)
    return frame(header, request.content)


def decode_request(header: bytes, body: bytes) -> Request:
    """The request of a frame's header and body (:class:`FrameError` if it is none)."""
    h = _object(header)
    path = h.get("path")
    content: bytes | Path = body
    if path is not None:
        if not isinstance(path, str) or not path or body:
            raise FrameError("'path' must be a non-empty string, with an empty body")
        content = Path(path)
    return Request(
        id=_typed(h, "id", int),
        config=_from_fields(AnalysisConfig, _typed(h, "config", dict)),
        content=content,
        expected_ms=_typed(h, "expected_ms", int, optional=True),
    )


def encode_reply(reply: Reply) -> bytes:
    """The frame of ``reply`` (it has no body)."""
    header: dict[str, Any] = {"id": reply.id, "cpu_s": reply.cpu_s}
    if reply.analysis is not None:
        header["analysis"] = _fields_of(reply.analysis)
    else:
        header["error"] = reply.error or "no analysis"
    return frame(header)[0]


def decode_reply(header: bytes, body: bytes = b"") -> Reply:
    """The reply of a frame's header (:class:`FrameError` if it is none)."""
    if body:
        raise FrameError("a reply has no body")
    h = _object(header)
    analysis = _typed(h, "analysis", dict, optional=True)
    error = _typed(h, "error", str, optional=True)
    if (analysis is None) == (error is None):
        raise FrameError("a reply carries either 'analysis' or 'error'")
    return Reply(
        id=_typed(h, "id", int),
        analysis=None if analysis is None else _from_fields(Analysis, analysis),
        error=error,
        cpu_s=_typed(h, "cpu_s", float),
    )


def decode_ready(header: bytes, body: bytes = b"") -> None:
    """Check a frame is the child's :data:`READY` (:class:`FrameError` if not)."""
    if body or _object(header) != READY:
        raise FrameError("a child's first frame must say it is ready")


def _object(header: bytes) -> dict[str, Any]:
    try:
        value = json.loads(header)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"header is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError("header is not a JSON object")
    return value


def _typed(obj: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    """``obj[key]`` checked to be ``kind`` (an int is a float too; a bool is no number)."""
    value = obj.get(key)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise FrameError(f"{key!r} is out of range") from None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise FrameError(f"{key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


_KINDS: dict[str, type] = {"int": int, "float": float, "bool": bool}
_Carried = TypeVar("_Carried", AnalysisConfig, Analysis)


def _fields_of(instance: AnalysisConfig | Analysis) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in fields(instance)}


def _from_fields(cls: type[_Carried], obj: dict[str, Any]) -> _Carried:
    """``cls`` from a JSON object holding exactly its fields, each of its type."""
    names = {f.name for f in fields(cls)}
    if set(obj) != names:
        raise FrameError(f"{cls.__name__} fields {sorted(obj)} are not {sorted(names)}")
    kinds = {
        f.name: _KINDS[f.type if isinstance(f.type, str) else f.type.__name__] for f in fields(cls)
    }
    return cls(**{name: _typed(obj, name, kinds[name]) for name in names})


# ---------------------------------------------------------------------------- the child


def read_exactly(stream: IO[bytes], n: int) -> bytes:
    """``n`` bytes of ``stream`` (:class:`FrameError` if it ends before them)."""
    data = stream.read(n) if n else b""
    if len(data) != n:
        raise FrameError(f"stream ended {len(data)} bytes into {n}")
    return data


def read_request(stream: IO[bytes]) -> Request | None:
    """The next request on ``stream``; ``None`` at its clean end (between frames)."""
    prefix = stream.read(PREFIX.size)
    if not prefix:
        return None
    head, body = frame_lengths(prefix + read_exactly(stream, PREFIX.size - len(prefix)))
    header = read_exactly(stream, head)
    return decode_request(header, read_exactly(stream, body))


def answer(request: Request, hang_marker: bytes = b"") -> Reply:
    """Analyse one request; every failure is a reply with an ``error``."""
    started = time.process_time()
    try:
        content = request.content
        if hang_marker and isinstance(content, bytes) and content.startswith(hang_marker):
            time.sleep(3600)  # test-only (HANG_MARKER_ENV): a decoder that never returns
        analysis = analyse(content, request.config, expected_ms=request.expected_ms)
    except AnalysisError as exc:
        return Reply(request.id, error=str(exc), cpu_s=time.process_time() - started)
    except Exception as exc:  # a spool file gone, a bug in analyse: this burst only
        error = f"{type(exc).__name__}: {exc}"
        return Reply(request.id, error=error, cpu_s=time.process_time() - started)
    return Reply(request.id, analysis=analysis, cpu_s=time.process_time() - started)


def _die_with_parent(parent: int) -> None:
    """Linux: be killed when the worker dies, even while stuck in the decoder."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Serve requests from stdin until it closes (``argv``: the parent's pid)."""
    args = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if args:
        _die_with_parent(int(args[0]))
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # stray writes to stdout must not corrupt the frames
    import miniaudio  # noqa: F401 (loaded once, before the first request)
    import numpy  # noqa: F401
    import webrtcvad  # noqa: F401

    hang_marker = os.environ.get(HANG_MARKER_ENV, "").encode()
    replies.write(frame(READY)[0])
    replies.flush()
    while True:
        try:
            request = read_request(requests)
        except FrameError as exc:
            print(f"fileserver.analysis_child: bad request frame: {exc}", file=sys.stderr)
            return 2
        if request is None:
            return 0
        replies.write(encode_reply(answer(request, hang_marker)))
        replies.flush()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the worker is gone
        os._exit(0)
