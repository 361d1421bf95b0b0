"""`server` backend: captions from an OpenAI-compatible inference server (vLLM, SGLang, LMDeploy,
`transformers serve`) through its chat completions endpoint.

The DataLoader workers turn each image's bytes, as stored in the tar, into a base64 data URL
(`DataUrl`: no decode, no re-encode); `caption` sends one request per image and prompt with up to
`max_concurrency` in flight (httpx, asyncio), and returns the captions in the batch's order.

Decoding:
    sample    temperature / top_p, `n = k` in one request; a server that refuses `n` or answers with
              fewer choices (transformers serve ignores it) gets k requests instead, from then on. Each
              request carries a `seed` drawn from torch's generator, which the stage seeds per batch.
    prompts   one caption per prompt, greedy (temperature 0): the same captions as the in-process
              backends' `decoding: prompts` on the same weights and pictures.
    beam      not offered: chat completions have no beam search.
`min_new_tokens` is sent as `min_tokens` (vLLM, SGLang); a server that refuses a field by name (HTTP
400/422 naming it: transformers serve refuses `min_tokens`) gets the request again without it, and the
field is dropped from then on (logged once).

Failures: connection errors, timeouts, 429 and 5xx are retried `retries` times with exponential backoff;
an image that still fails (an HTTP error, a timeout) gets no captions and its reason in
`CaptionBatchResult.failed`. A request that still cannot connect means the server is gone, not that the
image is bad: `ServerUnavailable` is raised, so no shard is written with such holes.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from typing import Any

import torch

from captioning.base import CaptionBatchResult, CaptionerError, GenerationOptions, ServerOptions

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Describe the image in one sentence."
MIME = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"GIF8": "image/gif"}
RETRY_STATUS = {408, 429}
MAX_BACKOFF_S = 30.0


class ServerUnavailable(CaptionerError):
    """The server could not be reached for a whole batch (stopped, crashed, wrong endpoint)."""


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


class _Failure(Exception):
    def __init__(self, message: str, connection: bool = False) -> None:
        super().__init__(message)
        self.connection = connection


class ServerCaptioner:
    """k captions per image from an OpenAI-compatible server; see the module docstring."""

    name = "server"
    input_size = 0  # nothing is decoded for the server

    def __init__(
        self, model: str, k: int, generation: GenerationOptions, server: ServerOptions, endpoint: str
    ) -> None:
        if generation.decoding == "beam":
            raise CaptionerError(
                "backend 'server': decoding 'beam' is not offered (use 'sample' or 'prompts')"
            )
        self.model_name, self.k, self.options, self.server = model, k, generation, server
        self.endpoint = endpoint.rstrip("/")
        self.url = self.endpoint + (
            "/chat/completions" if self.endpoint.endswith("/v1") else "/v1/chat/completions"
        )
        self.prompts = list(generation.prompts) or [DEFAULT_PROMPT]
        self.headers = {"Content-Type": "application/json"}
        if server.api_key_env:
            key = os.environ.get(server.api_key_env)
            if not key:
                raise CaptionerError(
                    f"backend 'server': environment variable {server.api_key_env} is not set"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        self.refused: set[str] = set()  # request fields the server refused (`n`, `min_tokens`, `seed`)
        self.last_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = None

    def image_transform(self) -> DataUrl:
        return DataUrl()

    def caption(self, inputs: list[str], alt_texts: list[str]) -> CaptionBatchResult:
        """`inputs`: one data URL per picture of the batch (what `DataUrl` made of its bytes)."""
        n = len(inputs)
        seeds = (
            torch.randint(0, 2**31 - 1, (n, self.k)).tolist() if self.options.decoding == "sample" else None
        )
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        outcomes = self._loop.run_until_complete(self._batch(inputs, seeds))
        captions = [o if isinstance(o, list) else [] for o in outcomes]
        failed = [str(o) if isinstance(o, _Failure) else None for o in outcomes]
        errors = [o for o in outcomes if isinstance(o, _Failure)]
        if errors:
            self.last_error = str(errors[-1])
        lost = [e for e in errors if e.connection]
        if lost:  # not the image's fault: the batch (and its shard) is redone when the stage reruns
            raise ServerUnavailable(f"caption server {self.endpoint} unreachable: {lost[-1]}")
        return CaptionBatchResult(captions, prompts=[], failed=failed)

    def close(self) -> None:
        if self._loop is not None:
            if self._client is not None:
                self._loop.run_until_complete(self._client.aclose())
            self._loop.close()
            self._loop = self._client = None

    # ----- requests -----

    async def _batch(self, urls: list[str], seeds: list[list[int]] | None) -> list[list[str] | _Failure]:
        import httpx

        if self._client is None:
            limits = httpx.Limits(max_connections=self.server.max_concurrency)
            self._client = httpx.AsyncClient(timeout=self.server.timeout_s, limits=limits)
        gate = asyncio.Semaphore(self.server.max_concurrency)
        return await asyncio.gather(
            *(self._image(gate, url, seeds[i] if seeds else None) for i, url in enumerate(urls))
        )

    async def _image(
        self, gate: asyncio.Semaphore, url: str, seeds: list[int] | None
    ) -> list[str] | _Failure:
        try:
            if self.options.decoding == "prompts":
                return [(await self._request(gate, url, prompt, 1, None))[0] for prompt in self.prompts]
            texts: list[str] = []
            while len(texts) < self.k:
                n = 1 if "n" in self.refused else self.k - len(texts)
                got = await self._request(gate, url, self.prompts[0], n, seeds[len(texts)])
                if len(got) < n and "n" not in self.refused:
                    log.info(
                        "caption server %s answers n=%d with %d choice(s): k requests per image",
                        self.url,
                        n,
                        len(got),
                    )
                    self.refused.add("n")
                texts += got[:n]
            return texts
        except _Failure as failure:
            return failure

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

    async def _request(
        self, gate: asyncio.Semaphore, url: str, prompt: str, n: int, seed: int | None
    ) -> list[str]:
        import httpx

        attempt = 0
        while True:
            body = self._body(url, prompt, n, seed)
            try:
                async with gate:
                    response = await self._client.post(self.url, json=body, headers=self.headers)
            except httpx.TimeoutException:
                failure = _Failure(f"no answer within timeout_s={self.server.timeout_s:g}")
            except httpx.TransportError as err:
                failure = _Failure(f"{type(err).__name__}: {err}".rstrip(": "), connection=True)
            else:
                if response.status_code == 200:
                    return self._texts(response)
                detail = _one_line(response.text)
                refused = self._refused_field(response.status_code, detail, body)
                if refused:
                    log.warning(
                        "caption server %s refuses `%s` (%s): sent without it", self.url, refused, detail
                    )
                    self.refused.add(refused)
                    continue  # not an attempt: the same request without the field
                failure = _Failure(f"HTTP {response.status_code}: {detail}")
                if response.status_code < 500 and response.status_code not in RETRY_STATUS:
                    raise failure
            if attempt >= self.server.retries:
                raise failure
            await asyncio.sleep(min(self.server.backoff_s * 2**attempt, MAX_BACKOFF_S))
            attempt += 1

    @staticmethod
    def _refused_field(status: int, detail: str, body: dict) -> str | None:
        if status not in (400, 422):
            return None
        for name in ("min_tokens", "n", "seed", "top_p"):
            if name in body and (f"'{name}'" in detail or f'"{name}"' in detail or f"`{name}`" in detail):
                return name
        return None

    def _texts(self, response) -> list[str]:
        try:
            choices = sorted(response.json()["choices"], key=lambda c: c.get("index", 0))
            return [choice["message"]["content"] or "" for choice in choices]
        except (ValueError, KeyError, TypeError) as err:
            raise _Failure(
                f"unreadable answer ({type(err).__name__}: {err}): {_one_line(response.text)}"
            ) from err


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit] + "..."


def build(
    model: str,
    k: int = 5,
    generation: GenerationOptions = GenerationOptions(),
    server: ServerOptions | None = None,
    endpoint: str | None = None,
) -> ServerCaptioner:
    """`endpoint`: the running server's base URL (for `serve`, the one the stage started)."""
    if not model:
        raise CaptionerError("the server backend needs `model` (the name the server serves)")
    endpoint = endpoint or (server.endpoint if server else None)
    if server is None or not endpoint:
        raise CaptionerError("the server backend needs a server section with `endpoint` or `serve`")
    return ServerCaptioner(model, k, generation, server, endpoint)
