"""`server` backend: captions from OpenAI-compatible inference servers (vLLM, SGLang, LMDeploy,
`transformers serve`) through their chat completions endpoint.

The DataLoader workers turn each image's bytes, as stored in the tar, into a base64 data URL
(`DataUrl`: no decode, no re-encode). The client is a window of requests in flight: `submit` hands
one image to an asyncio loop running in a thread of its own and returns a future of its captions,
so the stage (stages/caption/streaming.py) keeps feeding images across batches and shards while
earlier ones are answered; at most `max_concurrency` requests per endpoint are in flight, each sent
to the endpoint with the fewest outstanding. `caption` is the same per batch (it waits for the
batch's last image: the schedule of the first client, kept for the benchmark and the protocol).

Decoding:
    sample    temperature / top_p, `n = k` in one request; a server that refuses `n` or answers with
              fewer choices (transformers serve ignores it) gets k requests instead, from then on. The
              seeds are per image (`image_seeds`: its key and the stage seed), so sampled captions do
              not depend on the batch, the window or the order of answers.
    prompts   one caption per prompt, greedy (temperature 0): the same captions as the in-process
              backends' `decoding: prompts` on the same weights and pictures.
    beam      not offered: chat completions have no beam search.
`min_new_tokens` is sent as `min_tokens` (vLLM, SGLang); a server that refuses a field by name (HTTP
400/422 naming it: transformers serve refuses `min_tokens`) gets the request again without it, and the
field is dropped from then on (logged once).

Everything a server sends is untrusted (captioning/server_replies.py): an answer is read with a byte
limit (`max_reply_bytes`) and within a whole-request deadline (`deadline_s`, besides the per-read
`timeout_s`), an answer without choices or with a caption over 10,000 characters fails its image,
redirects are not followed (the API key would go with them), and server text reaches an error line
or a shard only scrubbed of the key and cut to one line.

Failures: connection errors, timeouts, 429 and 5xx are retried `retries` times with exponential backoff;
an image that still fails gets no captions and its reason (`Failure`). A request that still cannot
connect means the server is gone, not that the image is bad (`ServerUnavailable`), and 401/403 mean
the key is refused (`ServerRefused`): the stage stops, so no shard is written with such holes.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from captioning.base import CaptionBatchResult, CaptionerError, GenerationOptions, ServerOptions
from captioning.server_replies import BadReply, Scrubber, choice_texts, read_bounded

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image in one sentence."
MIME = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"GIF8": "image/gif"}
RETRY_STATUS = {408, 429}
REFUSED_STATUS = {401, 403}
MAX_BACKOFF_S = 30.0
WINDOW_PER_SLOT = 4  # images in flight per request slot: the next request is ready when a slot frees


class ServerUnavailable(CaptionerError):
    """The server could not be reached (stopped, crashed, wrong endpoint)."""


class ServerRefused(ServerUnavailable):
    """The server refuses our requests as such (HTTP 401/403: the API key)."""


def mime_type(data: bytes) -> str:
    for magic, mime in MIME.items():
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError("not a JPEG, PNG, GIF or WebP file")


class DataUrl:
    """Image file bytes -> `data:<mime>;base64,...`; runs in DataLoader workers on the bytes as stored
    (`encoded` tells the loader to pass them undecoded). Bytes that are no image file are refused here,
    so they are counted as corrupt like in every backend."""

    encoded = True

    def __call__(self, data: bytes) -> str:
        return f"data:{mime_type(data)};base64,{base64.b64encode(data).decode('ascii')}"


class Failure(Exception):
    """Why an image has no captions. `retry`: another attempt may succeed; `fatal`: not the image's
    fault ("unreachable" or "refused"), the stage stops."""

    def __init__(self, message: str, retry: bool = False, fatal: str | None = None) -> None:
        super().__init__(message)
        self.retry, self.fatal = retry, fatal


@dataclass
class Endpoint:
    base: str
    url: str
    outstanding: int = 0
    sent: int = 0


def chat_url(base: str) -> str:
    base = base.rstrip("/")
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class ServerCaptioner:
    """k captions per image from OpenAI-compatible servers; see the module docstring."""

    name = "server"
    input_size = 0  # nothing is decoded for the server
    streams = True  # the stage may `submit` images one by one (stages/caption/streaming.py)

    def __init__(
        self, model: str, k: int, generation: GenerationOptions, server: ServerOptions, endpoints: list[str]
    ) -> None:
        if generation.decoding == "beam":
            raise CaptionerError(
                "backend 'server': decoding 'beam' is not offered (use 'sample' or 'prompts')"
            )
        self.model_name, self.k, self.options, self.server = model, k, generation, server
        self.endpoints = [Endpoint(e.rstrip("/"), chat_url(e)) for e in endpoints]
        self.endpoint = ", ".join(e.base for e in self.endpoints)
        self.prompts = list(generation.prompts) or [DEFAULT_PROMPT]
        self.headers = {"Content-Type": "application/json"}
        key = None
        if server.api_key_env:
            key = os.environ.get(server.api_key_env)
            if not key:
                raise CaptionerError(
                    f"backend 'server': environment variable {server.api_key_env} is not set"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        self.scrub = Scrubber([key] if key else [])
        self.refused: set[str] = set()  # request fields the server refused (`n`, `min_tokens`, `seed`)
        self.last_error: str | None = None
        self.slots = server.max_concurrency * len(self.endpoints)
        # images in flight; an image's requests go one after the other (its first failure ends it)
        self.window = WINDOW_PER_SLOT * self.slots
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client = self._gate = None

    def image_transform(self) -> DataUrl:
        return DataUrl()

    def image_seeds(self, seed: int, key: str) -> list[int] | None:
        """One seed per caption of the image `key` (sample decoding), from the stage seed and the key."""
        if self.options.decoding != "sample":
            return None
        return [
            int.from_bytes(hashlib.sha256(f"{seed}:{key}:{j}".encode()).digest()[:4], "little") & 0x7FFFFFFF
            for j in range(self.k)
        ]

    def submit(self, url: str, seeds: list[int] | None) -> concurrent.futures.Future:
        """Caption one image (its data URL) in the background: a future of its captions or `Failure`."""
        self._start()
        return asyncio.run_coroutine_threadsafe(self._image(url, seeds), self._loop)

    def check(self, outcome: list[str] | Failure) -> list[str] | Failure:
        """`outcome` as it is, unless it says the server is gone or refuses us: then the stage stops."""
        if isinstance(outcome, Failure):
            self.last_error = str(outcome)
            if outcome.fatal == "refused":
                raise ServerRefused(
                    f"caption server {self.endpoint} refuses the requests ({outcome}); "
                    "check the API key (server.api_key_env) and the model name"
                )
            if outcome.fatal:  # not the image's fault: its shard is redone when the stage reruns
                raise ServerUnavailable(f"caption server {self.endpoint} unreachable: {outcome}")
        return outcome

    def caption(self, inputs: list[str], alt_texts: list[str]) -> CaptionBatchResult:
        """A batch at once, answered when its last image is (`inputs`: one data URL per picture)."""
        n = len(inputs)
        seeds = (
            torch.randint(0, 2**31 - 1, (n, self.k)).tolist() if self.options.decoding == "sample" else None
        )
        futures = [self.submit(url, seeds[i] if seeds else None) for i, url in enumerate(inputs)]
        outcomes = [self.check(f.result()) for f in futures]
        captions = [o if isinstance(o, list) else [] for o in outcomes]
        failed = [str(o) if isinstance(o, Failure) else None for o in outcomes]
        return CaptionBatchResult(captions, prompts=[], failed=failed)

    def requests_sent(self) -> dict[str, int]:
        return {e.base: e.sent for e in self.endpoints}

    def close(self) -> None:
        """Cancel what is in flight, close the connections, stop the loop's thread."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(30)
            loop.close()

    # ----- the loop -----

    def _start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="caption-client", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    async def _open(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.slots, max_keepalive_connections=self.slots)
        self._client = httpx.AsyncClient(timeout=self.server.timeout_s, limits=limits, follow_redirects=False)
        self._gate = asyncio.Semaphore(self.slots)

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    # ----- requests -----

    async def _image(self, url: str, seeds: list[int] | None) -> list[str] | Failure:
        try:
            if self.options.decoding == "prompts":
                return [(await self._request(url, prompt, 1, None))[0] for prompt in self.prompts]
            return await self._sampled(url, seeds)
        except Failure as failure:
            return failure

    async def _sampled(self, url: str, seeds: list[int]) -> list[str]:
        """k captions: `n = k` in one request, or k requests of one where `n` is not honoured. Every
        request adds at least one caption or fails (`choice_texts`), so this ends."""
        texts: list[str] = []
        if "n" not in self.refused:
            texts = (await self._request(url, self.prompts[0], self.k, seeds[0]))[: self.k]
            if len(texts) < self.k and "n" not in self.refused:
                log.info(
                    "caption server %s answers n=%d with %d choice(s): k requests per image",
                    self.endpoint,
                    self.k,
                    len(texts),
                )
                self.refused.add("n")
        for i in range(len(texts), self.k):
            texts.append((await self._request(url, self.prompts[0], 1, seeds[i]))[0])
        return texts

    def _body(self, url: str, prompt: str, n: int, seed: int | None) -> dict[str, Any]:
        opts = self.options
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": opts.max_new_tokens,
        }
        if opts.decoding == "sample":
            body.update(temperature=opts.temperature, top_p=opts.top_p, seed=seed)
            if n > 1:
                body["n"] = n
        else:
            body["temperature"] = 0.0
        if opts.min_new_tokens:
            body["min_tokens"] = opts.min_new_tokens
        return {k: v for k, v in body.items() if k not in self.refused and v is not None}

    async def _request(self, url: str, prompt: str, n: int, seed: int | None) -> list[str]:
        """The texts of one request, retried as the module docstring says; else raises `Failure`."""
        attempt = 0
        while True:
            body = self._body(url, prompt, n, seed)
            async with self._gate:
                endpoint = min(self.endpoints, key=lambda e: e.outstanding)
                endpoint.outstanding += 1
                endpoint.sent += 1
                try:
                    status, data, location = await self._post(endpoint, body)
                except Failure as failure:
                    status, error = None, failure
                finally:
                    endpoint.outstanding -= 1
            if status == 200:
                try:
                    return choice_texts(data, n, self.scrub)
                except BadReply as err:
                    raise Failure(str(err)) from None
            if status is not None:
                error = self._http_failure(status, data, location, body)
                if error is None:
                    continue  # a refused field: the same request without it, not an attempt
            if not error.retry or attempt >= self.server.retries:
                raise error
            await asyncio.sleep(min(self.server.backoff_s * 2**attempt, MAX_BACKOFF_S))
            attempt += 1

    async def _post(self, endpoint: Endpoint, body: dict) -> tuple[int, bytes, str | None]:
        """(status, body up to max_reply_bytes, Location) of one request within `deadline_s`."""
        import httpx

        async def send() -> tuple[int, bytes, str | None]:
            async with self._client.stream("POST", endpoint.url, json=body, headers=self.headers) as answer:
                data = await read_bounded(answer, self.server.max_reply_bytes)
                return answer.status_code, data, answer.headers.get("location")

        try:
            return await asyncio.wait_for(send(), self.server.deadline_s)
        except asyncio.TimeoutError:
            deadline = self.server.deadline_s
            raise Failure(f"no whole answer within deadline_s={deadline:g}", retry=True) from None
        except httpx.TimeoutException:
            raise Failure(f"no answer within timeout_s={self.server.timeout_s:g}", retry=True) from None
        except httpx.TransportError as err:
            text = self.scrub(f"{type(err).__name__}: {err}").rstrip(": ")
            raise Failure(text, retry=True, fatal="unreachable") from None
        except BadReply as err:
            raise Failure(str(err)) from None

    def _http_failure(self, status: int, data: bytes, location: str | None, body: dict) -> Failure | None:
        """What a non-200 answer means; None when it refuses a field we can leave out."""
        detail = self.scrub(data)
        if status in REFUSED_STATUS:
            return Failure(f"HTTP {status}: {detail}", fatal="refused")
        if 300 <= status < 400:
            where = self.scrub(location, 120) or "nowhere"
            return Failure(f"HTTP {status}: redirect to {where} not followed (the API key would go with it)")
        refused = self._refused_field(status, detail, body)
        if refused:
            log.warning(
                "caption server %s refuses `%s` (%s): sent without it", self.endpoint, refused, detail
            )
            self.refused.add(refused)
            return None
        return Failure(f"HTTP {status}: {detail}", retry=status >= 500 or status in RETRY_STATUS)

    @staticmethod
    def _refused_field(status: int, detail: str, body: dict) -> str | None:
        if status not in (400, 422):
            return None
        for name in ("min_tokens", "n", "seed", "top_p"):
            if name in body and (f"'{name}'" in detail or f'"{name}"' in detail or f"`{name}`" in detail):
                return name
        return None


def build(
    model: str,
    k: int = 5,
    generation: GenerationOptions = GenerationOptions(),
    server: ServerOptions | None = None,
) -> ServerCaptioner:
    """`server.urls`: the running servers' base URLs (for `serve`, the ones the stage started)."""
    if not model:
        raise CaptionerError("the server backend needs `model` (the name the server serves)")
    if server is None or not server.urls:
        raise CaptionerError("the server backend needs a server section with `endpoint(s)` or `serve`")
    return ServerCaptioner(model, k, generation, server, server.urls)
