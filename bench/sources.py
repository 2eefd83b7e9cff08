"""The benchmark's recording source: an aiohttp server in its own process.

``python -m bench.sources --port P --clips DIR`` serves, for any path
``/c/<k>/<name>.mp3``, the bytes of ``DIR/<k mod n>.mp3`` (n clips, loaded in memory
once), and ``/f/<name>`` streams ``DIR/<name>`` from disk (large files). A
ThreadingHTTPServer tops out near the worker's rate; aiohttp does not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aiohttp import web


def build_app(clips_dir: Path) -> web.Application:
    """The aiohttp application serving the clips of ``clips_dir``."""
    clips = [p.read_bytes() for p in sorted(clips_dir.glob("clip-*.mp3"))]
    if not clips:
        raise SystemExit(f"no clip-*.mp3 in {clips_dir}")

    async def clip(request: web.Request) -> web.Response:
        k = int(request.match_info["k"])
        return web.Response(body=clips[k % len(clips)], content_type="audio/mpeg")

    async def big(request: web.Request) -> web.StreamResponse:
        path = clips_dir / Path(request.match_info["name"]).name
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": "audio/mpeg"})

    app = web.Application()
    app.router.add_get("/c/{k:[0-9]+}/{name}", clip)
    app.router.add_get("/f/{name}", big)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sources")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clips", type=Path, required=True)
    args = parser.parse_args(argv)
    web.run_app(
        build_app(args.clips), host="127.0.0.1", port=args.port, print=None, access_log=None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
