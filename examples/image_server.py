"""A local HTTP server of generated images (and deliberately bad responses) on 127.0.0.1.

Used by the demo and the tests, so img2dataset really downloads over HTTP without the internet.

    python -m examples.image_server --port 8765     # serves until interrupted

Paths: `/img/<n>.jpg` a deterministic picture for n; `/missing.jpg` 404; `/page.html` an HTML body
with status 200; `/truncated.jpg` a JPEG cut off after its header; `/huge.png` a valid PNG header
declaring 100000 x 100000 pixels (a decompression bomb); `/flaky/<n>.jpg` 503 on the first
request for that path, the picture after; `/slow/<n>.jpg` the picture after 0.3 s; `/wide/<n>.jpg`
a 192 x 48 picture (aspect ratio 4, for img2dataset's `max_aspect_ratio` filter).
"""

from __future__ import annotations

import argparse
import io
import struct
import threading
import time
import zlib
from functools import lru_cache, partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40), (160, 60, 200), (40, 200, 200)]


@lru_cache(maxsize=4096)
def generated_jpeg(n: int, size: int = 96) -> bytes:
    """A small deterministic picture: background colour, a shape and a position that depend on n."""
    image = Image.new("RGB", (size, size), PALETTE[n % len(PALETTE)])
    draw = ImageDraw.Draw(image)
    fill = PALETTE[(n // len(PALETTE) + 1) % len(PALETTE)]
    x, y = (n * 7) % (size // 2), (n * 13) % (size // 2)
    box = (x, y, x + size // 3 + n % 11, y + size // 3 + n % 7)
    (draw.ellipse if n % 2 else draw.rectangle)(box, fill=fill)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


@lru_cache(maxsize=64)
def wide_jpeg(n: int) -> bytes:
    """A 192 x 48 picture: four times as wide as high."""
    image = Image.new("RGB", (192, 48), PALETTE[n % len(PALETTE)])
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def bomb_png(side: int = 100_000) -> bytes:
    """A PNG whose header declares side x side pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _picture_number(path: str, prefix: str) -> int | None:
    stem = path[len(prefix) : -4] if path.startswith(prefix) and path.endswith(".jpg") else ""
    return int(stem) if stem.isdigit() else None


class _Handler(BaseHTTPRequestHandler):
    slow_s = 0.3

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        for prefix in ("/img/", "/flaky/", "/slow/", "/wide/"):
            n = _picture_number(path, prefix)
            if n is not None:
                return self._picture(prefix, path, n)
        if path == "/page.html":
            return self._send(200, "text/html", b"<html><body>not an image</body></html>")
        if path == "/truncated.jpg":
            return self._send(200, "image/jpeg", generated_jpeg(1)[:200])
        if path == "/huge.png":
            return self._send(200, "image/png", bomb_png())
        self._send(404, "text/plain", b"not found")

    def _picture(self, prefix: str, path: str, n: int) -> None:
        if prefix == "/flaky/" and path not in self.server.seen_flaky:
            self.server.seen_flaky.add(path)
            return self._send(503, "text/plain", b"try again")
        if prefix == "/slow/":
            time.sleep(self.slow_s)
        self._send(200, "image/jpeg", wide_jpeg(n) if prefix == "/wide/" else generated_jpeg(n))

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test and demo output readable
        pass


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class ImageServer:
    """`with ImageServer() as server: server.url("/img/3.jpg")` -> http://127.0.0.1:<port>/img/3.jpg

    `ImageServer(port, folder=F)` serves the files under F instead (the demo's generated world)."""

    def __init__(self, port: int = 0, folder: Path | None = None) -> None:
        handler = _Handler if folder is None else partial(_QuietFiles, directory=str(folder))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.httpd.seen_flaky = set()  # per server, so each test starts with fresh flaky paths
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with ImageServer(args.port) as server:
        print(f"serving on {server.url('/')}", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
