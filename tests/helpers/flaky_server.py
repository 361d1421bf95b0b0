"""A real HTTP proxy on 127.0.0.1 in front of an OpenAI-compatible server, that misbehaves on purpose:
the first attempt of every distinct request answers 500 (`fail_first`), requests whose body holds one
of `fail` answer 500 always, requests whose body holds one of `hang` never get an answer."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FlakyProxy:
    def __init__(
        self, upstream: str, fail_first: bool = False, fail: tuple[str, ...] = (), hang: tuple[str, ...] = ()
    ) -> None:
        self.upstream, self.fail_first, self.fail, self.hang = upstream.rstrip("/"), fail_first, fail, hang
        self.seen: set[bytes] = set()
        self.answered_500 = self.hung = self.forwarded = 0
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FlakyProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

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
