"""An inference engine simulated as a real OpenAI-compatible HTTP server on 127.0.0.1, for the
caption client's tests and its benchmark (benchmarks/caption.py --server).

`EngineSimulator(latency_s, capacity)`: `/v1/chat/completions` serves at most `capacity` requests at
once (the rest wait in its queue, as in an engine's scheduler); each takes `latency_s`, or
`straggler_factor` times that for a seeded `straggler_fraction` of requests, or `slow[digest]` seconds
for an image whose `digest_of` is a key of `slow`; an image in `failing` gets HTTP 500. Answers are
deterministic: greedy captions depend on the image and the prompt, sampled ones also on the request's
`seed` and the choice; `n` is honoured. `/health`, `/v1/models` (naming `model`) and `/stats` (the
request log) answer at once.
`in_service` counts the requests in service now; `log` holds per request (arrived, started,
ended, image digest, prompt, seed, n, Authorization).

    python -m tests.helpers.engine_simulator --latency 0.03 --capacity 16   # prints its port; ends with stdin
    python -m tests.helpers.engine_simulator --port 8000 --model M          # until killed (`serve`)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers.flaky_server import _ServedOnLocalhost

WORDS = ["red", "green", "small", "round", "square", "bright", "dark", "striped", "tall", "flat"]
NOUNS = ["circle", "triangle", "star", "square", "shape", "object", "figure", "picture"]


def image_digest(body: dict) -> str:
    """sha256 of the picture in a chat completion request (its data URL's base64 text, undecoded)."""
    for message in body.get("messages", []):
        for part in message.get("content", []):
            if isinstance(part, dict) and part.get("type") == "image_url":
                return hashlib.sha256(part["image_url"]["url"].split(",", 1)[1].encode()).hexdigest()
    return ""


def digest_of(jpeg: bytes) -> str:
    """What `image_digest` gives for a request carrying `jpeg`."""
    return hashlib.sha256(base64.b64encode(jpeg)).hexdigest()


def prompt_of(body: dict) -> str:
    for message in body.get("messages", []):
        for part in message.get("content", []):
            if isinstance(part, dict) and part.get("type") == "text":
                return part["text"]
    return ""


def caption_text(*parts) -> str:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return f"a {WORDS[digest[0] % 10]} {WORDS[digest[1] % 10]} {NOUNS[digest[2] % 8]} number {digest[3]}"


class _Backlogged(ThreadingHTTPServer):
    request_queue_size = 1024  # a window of connections opened at once is not dropped (SYN retries: 1 s)
    daemon_threads = True


class EngineSimulator(_ServedOnLocalhost):
    def __init__(
        self,
        latency_s: float = 0.02,
        capacity: int = 4,
        straggler_fraction: float = 0.0,
        straggler_factor: float = 5.0,
        seed: int = 0,
        model: str = "sim",
        slow: dict[str, float] | None = None,
        failing: set[str] | None = None,
    ) -> None:
        self.latency_s, self.capacity, self.model = latency_s, capacity, model
        self.straggler_fraction, self.straggler_factor, self.seed = straggler_fraction, straggler_factor, seed
        self.slow, self.failing = slow or {}, failing if failing is not None else set()
        self.slots = threading.Semaphore(capacity)
        self.log: list[dict] = []
        self.in_service = 0
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.server = _Backlogged(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def service_s(self, digest: str, prompt: str, seed) -> float:
        if digest in self.slow:
            return self.slow[digest]
        draw = hashlib.sha256(f"{self.seed}:{digest}:{prompt}:{seed}".encode()).digest()
        straggles = int.from_bytes(draw[:4], "little") / 2**32 < self.straggler_fraction
        return self.latency_s * (self.straggler_factor if straggles else 1.0)

    def answer(self, body: dict, auth: str | None) -> dict:
        arrived = time.monotonic()
        digest, prompt, seed, n = image_digest(body), prompt_of(body), body.get("seed"), body.get("n", 1)
        with self.slots:
            started = time.monotonic()
            with self.lock:
                self.in_service += 1
            time.sleep(self.service_s(digest, prompt, seed))
            with self.lock:
                self.in_service -= 1
        ended = time.monotonic()
        with self.lock:
            entry = {"arrived": arrived, "started": started, "ended": ended, "image": digest}
            self.log.append({**entry, "prompt": prompt, "seed": seed, "n": n, "auth": auth})
        greedy = body.get("temperature", 1.0) == 0
        texts = [
            caption_text(digest, prompt) if greedy else caption_text(digest, prompt, seed, i)
            for i in range(n)
        ]
        choices = [{"index": i, "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)]
        return {"object": "chat.completion", "model": self.model, "choices": choices}

    def _handler(self):
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as engines serve

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/health":
                    return self._send(200, {"status": "ok"})
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": engine.model}]})
                if self.path == "/stats":
                    with engine.lock:
                        return self._send(200, {"log": list(engine.log)})
                self._send(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if image_digest(body) in engine.failing:
                    return self._send(500, {"error": "injected failure"})
                self._send(200, engine.answer(body, self.headers.get("Authorization")))

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="an engine simulator on 127.0.0.1")
    parser.add_argument("--latency", type=float, default=0.03)
    parser.add_argument("--capacity", type=int, default=16)
    parser.add_argument("--straggler-fraction", type=float, default=0.05)
    parser.add_argument("--straggler-factor", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="a fixed port: serve until killed")
    parser.add_argument("--model", default="sim")
    args = parser.parse_args()
    engine = EngineSimulator(
        args.latency, args.capacity, args.straggler_fraction, args.straggler_factor, args.seed, args.model
    )
    if args.port:
        engine.server.server_close()
        engine.server = _Backlogged(("127.0.0.1", args.port), engine._handler())
        engine.server.serve_forever()
    with engine:
        print(engine.port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


if __name__ == "__main__":
    main()
