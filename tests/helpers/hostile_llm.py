"""A hostile OpenAI-compatible server: a real HTTP server on 127.0.0.1 whose chat completions
answer badly on purpose, one way per `mode`:

    401-echo       HTTP 401 whose body echoes every request header (Authorization too), as gateways do
    no-choices     200 with `choices: []`
    fewer-choices  200 with one choice fewer than the request's `n` (none for n = 1)
    trickle        200, Content-Length, then the body one byte every `trickle_s`
    huge           200, a 50 MB body (no Content-Length: the end is the connection's close)
    long-caption   200, one caption of 20,000 characters
    invalid-json   200 with a body that is not JSON
    redirect       307 to `/stolen` on this server (which records whoever follows it)

`/health` and `/v1/models` answer normally. `seen` holds (method, path, Authorization) per request.

    with HostileLLM("401-echo") as server: server.url
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers.flaky_server import _ServedOnLocalhost

MODES = (
    "401-echo",
    "no-choices",
    "fewer-choices",
    "trickle",
    "huge",
    "long-caption",
    "invalid-json",
    "redirect",
)
HUGE_BYTES = 50 * 1024 * 1024


def _choices(n: int, text: str = "a caption") -> list[dict]:
    return [{"index": i, "message": {"role": "assistant", "content": text}} for i in range(n)]


class HostileLLM(_ServedOnLocalhost):
    def __init__(self, mode: str, port: int = 0, trickle_s: float = 0.5) -> None:
        assert mode in MODES, mode
        self.mode, self.trickle_s = mode, trickle_s
        self.seen: list[tuple[str, str, str | None]] = []
        self._serve(self._handler())
        if port:  # a fixed port (another process "already listening" there)
            self.server.server_close()
            self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
            self.server.daemon_threads = True
            self.port = port
        self.url = f"http://127.0.0.1:{self.port}"

    def _handler(self):
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _record(self) -> None:
                with hostile.lock:
                    hostile.seen.append((self.command, self.path, self.headers.get("Authorization")))

            def _send(self, status: int, data: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._record()
                if self.path == "/health":
                    return self._send(200, b'{"status": "ok"}')
                if self.path == "/v1/models":
                    return self._send(200, b'{"data": [{"id": "sim"}]}')
                self._send(404, b'{"error": "not found"}')

            def do_POST(self) -> None:  # noqa: N802
                self._record()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path == "/stolen":
                    return self._send(200, json.dumps({"choices": _choices(1, "stolen")}).encode())
                try:
                    getattr(self, "_" + hostile.mode.replace("-", "_"))(body)
                except OSError:  # the client cut the connection (a limit of its own)
                    self.close_connection = True

            def _401_echo(self, body: dict) -> None:
                echoed = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
                message = (
                    f"Incorrect API key provided: {self.headers.get('Authorization')}. Headers: {echoed}"
                )
                self._send(401, json.dumps({"error": {"message": message}}).encode())

            def _no_choices(self, body: dict) -> None:
                self._send(200, b'{"object": "chat.completion", "choices": []}')

            def _fewer_choices(self, body: dict) -> None:
                n = max(int(body.get("n", 1)) - 1, 0)
                self._send(200, json.dumps({"choices": _choices(n)}).encode())

            def _trickle(self, body: dict) -> None:
                data = json.dumps({"choices": _choices(1)}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(len(data)):
                    if hostile.stopping.wait(hostile.trickle_s):
                        break
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                self.close_connection = True

            def _huge(self, body: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"choices": [{"index": 0, "message": {"content": "')
                block = b"x" * (1 << 20)
                for _ in range(HUGE_BYTES // len(block)):
                    self.wfile.write(block)
                self.wfile.write(b'"}}]}')
                self.close_connection = True

            def _long_caption(self, body: dict) -> None:
                self._send(200, json.dumps({"choices": _choices(1, "word " * 4000)}).encode())

            def _invalid_json(self, body: dict) -> None:
                self._send(200, b"<html>502 Bad Gateway, but as 200</html>")

            def _redirect(self, body: dict) -> None:
                self._send(307, b"", {"Location": f"{hostile.url}/stolen"})

        return Handler
