"""Real HTTP servers on 127.0.0.1 that misbehave on purpose.

`FlakyProxy`: a proxy in front of an OpenAI-compatible server: the first attempt of every distinct
request answers 500 (`fail_first`), requests whose body holds one of `fail` answer 500 always,
requests whose body holds one of `hang` never get an answer.

`HostileImageServer`: responses that attack an image downloader (see its docstring).
"""

from __future__ import annotations

import functools
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from examples.image_server import generated_jpeg


class _ServedOnLocalhost:
    """A ThreadingHTTPServer on a free 127.0.0.1 port, served from a daemon thread while in `with`."""

    def _serve(self, handler) -> None:
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


class FlakyProxy(_ServedOnLocalhost):
    def __init__(
        self, upstream: str, fail_first: bool = False, fail: tuple[str, ...] = (), hang: tuple[str, ...] = ()
    ) -> None:
        self.upstream, self.fail_first, self.fail, self.hang = upstream.rstrip("/"), fail_first, fail, hang
        self.seen: set[bytes] = set()
        self.answered_500 = self.hung = self.forwarded = 0
        self._serve(self._handler())
        self.url = f"http://127.0.0.1:{self.port}"

    def _decide(self, body: bytes) -> str:
        text = body.decode("utf-8", "replace")
        with self.lock:
            if any(h in text for h in self.hang):
                self.hung += 1
                return "hang"
            first = body not in self.seen
            self.seen.add(body)
            if any(f in text for f in self.fail) or (self.fail_first and first):
                self.answered_500 += 1
                return "500"
            self.forwarded += 1
            return "forward"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self, body: bytes | None) -> None:
                request = urllib.request.Request(
                    proxy.upstream + self.path, data=body, headers={"Content-Type": "application/json"}
                )
                try:
                    with urllib.request.urlopen(request, timeout=120) as answer:
                        status, data = answer.status, answer.read()
                except urllib.error.HTTPError as err:
                    status, data = err.code, err.read()
                self._send(status, data)

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                decision = proxy._decide(body)
                if decision == "hang":
                    proxy.stopping.wait(120)
                elif decision == "500":
                    self._send(500, b'{"error": "injected failure"}')
                else:
                    self._forward(body)

        return Handler


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows) -> bytes:
    """A PNG from an iterable of raw scanlines (filter byte included), compressed as they come."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(1)  # fast; one colour compresses well anyway
    idat = b"".join(packer.compress(row) for row in rows) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@functools.lru_cache(maxsize=2)
def one_colour_png(side: int) -> bytes:
    """A real, fully decodable side x side RGB PNG of one colour: 3 * side**2 bytes decoded, a few MB."""
    row = b"\0" + bytes((200, 120, 40)) * side
    return _png(side, side, 8, 2, (row for _ in range(side)))


def grey16_gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """16-bit grey samples rising from 0 (left) to 65535 (right)."""
    line = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.tile(line, (height, 1))


def grey16_png(pixels: np.ndarray) -> bytes:
    height, width = pixels.shape
    rows = (b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    return _png(width, height, 16, 0, rows)


class HostileImageServer(_ServedOnLocalhost):
    """`with HostileImageServer() as server: server.url("/empty.jpg")`

    Paths: `/img/<n>.jpg` a good picture; `/empty.jpg` status 200 with an empty body;
    `/big.png` a one-colour PNG of `big_side` x `big_side` pixels; `/grey16.png` the 16-bit grey
    gradient of `grey16_gradient()`; `/trickle-body.jpg` headers at once, then a 600-byte body one
    byte every `trickle_s`; `/trickle-head.jpg` the status line and headers one byte every
    `trickle_s`. Every read sees a byte long before any socket timeout, so only a total deadline
    ends them. `trickles` holds (path, seconds from request to the client cutting the connection,
    or None when the whole response was sent).
    """

    def __init__(self, big_side: int = 16000, trickle_s: float = 0.1) -> None:
        self.trickle_s = trickle_s
        # made before serving: made on the first request, they would count against a client's deadline
        self.big_png, self.grey16_png = one_colour_png(big_side), grey16_png(grey16_gradient())
        self.trickles: list[tuple[str, float | None]] = []
        self._serve(self._handler())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _handler(self):
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0]
                if path.startswith("/img/") and path[5:-4].isdigit():
                    return self._send(200, "image/jpeg", generated_jpeg(int(path[5:-4])))
                if path == "/empty.jpg":
                    return self._send(200, "image/jpeg", b"")
                if path == "/big.png":
                    return self._send(200, "image/png", hostile.big_png)
                if path == "/grey16.png":
                    return self._send(200, "image/png", hostile.grey16_png)
                if path in ("/trickle-body.jpg", "/trickle-head.jpg"):
                    return self._trickle(path)
                self._send(404, "text/plain", b"not found")

            def _send(self, code: int, kind: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _trickle(self, path: str) -> None:
                started, body = time.monotonic(), b"\xff" * 600
                head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
                slow = head.encode() + body if path == "/trickle-head.jpg" else body
                seconds: float | None = None
                try:
                    if path == "/trickle-body.jpg":
                        self.wfile.write(head.encode())
                    for i in range(len(slow)):
                        if hostile.stopping.wait(hostile.trickle_s):
                            break
                        self.wfile.write(slow[i : i + 1])
                except OSError:  # the client cut the connection
                    seconds = time.monotonic() - started
                self.close_connection = True
                with hostile.lock:
                    hostile.trickles.append((path, seconds))

        return Handler
