"""What an OpenAI-compatible server sends back, treated as untrusted: read with a byte limit, parsed
and checked before use, and any text of it that may reach a log, an error line or a shard scrubbed
of secrets and cut to one short line.

    read_bounded(response, limit)    the body of an httpx streaming response, at most `limit` bytes
    choice_texts(data, n, limit)     the texts of a chat completion's choices, checked
    Scrubber(secrets)(text)          one line, secrets and bearer tokens replaced, cut to 300 characters

Used by captioning/server.py; imports nothing else from the project.
"""

from __future__ import annotations

import json
import re

MAX_CAPTION_CHARS = 10_000  # as for the caption bank (stages/caption/bank.py): more is not a caption
SCAN_CHARS = 4096  # server text looked at for an error line, before scrubbing and cutting
LINE_CHARS = 300
BEARER = re.compile(r"(?i)\b(bearer\s+|(?:api[-_ ]?key|token|password)\s*[:=]\s*[\"']?)([^\s\"',;}]+)")
HIDDEN = "***"


class BadReply(Exception):
    """An answer that cannot be used: too large, not JSON, not a chat completion, a caption too long.
    `retry` is False: the same request would get the same answer."""


class Scrubber:
    """Text from a server, made safe to write: the secrets (the API key) replaced wherever they
    appear, bearer tokens and `api_key=...` values hidden, control characters dropped, one line of
    at most LINE_CHARS characters. Secrets are replaced before cutting, so a cut cannot leave part
    of a key behind."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = sorted((s for s in secrets if s), key=len, reverse=True)

    def __call__(self, text: str | bytes | None, limit: int = LINE_CHARS) -> str:
        if text is None:
            return ""
        if isinstance(text, bytes):
            text = text[: SCAN_CHARS * 4].decode("utf-8", "replace")
        text = str(text)[: SCAN_CHARS + max((len(s) for s in self.secrets), default=0)]
        for secret in self.secrets:
            text = text.replace(secret, HIDDEN)
        text = BEARER.sub(lambda m: f"{m.group(1)}{HIDDEN}", text)
        line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
        return line if len(line) <= limit else line[:limit] + "..."


async def read_bounded(response, limit: int) -> bytes:
    """The (decoded) body of a streaming httpx response; more than `limit` bytes is a `BadReply`,
    found without reading the rest (a declared Content-Length first, then while reading)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadReply(f"answer of {int(declared)} bytes (more than max_reply_bytes={limit})")
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > limit:
            raise BadReply(f"answer larger than max_reply_bytes={limit}")
    return bytes(data)


def choice_texts(body: bytes, n: int, scrub: Scrubber) -> list[str]:
    """The texts of the first `n` choices (by `index`) of a chat completion; an answer without a
    usable choice, or with a caption longer than MAX_CAPTION_CHARS, is a `BadReply`. Fewer than `n`
    choices are returned as they are (a server that ignores `n`)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise BadReply(f"answer is not JSON: {scrub(body, 120)}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        raise BadReply(f"answer has no `choices` list: {scrub(body, 120)}")
    if not choices:
        raise BadReply("answer has no choices (`choices: []`)")
    texts = []
    for choice in sorted(choices, key=_index)[:n]:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise BadReply(f"a choice without a `message`: {scrub(body, 120)}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise BadReply(f"a choice's `message.content` is not text: {scrub(body, 120)}")
        if content and len(content) > MAX_CAPTION_CHARS:
            raise BadReply(f"a caption of {len(content)} characters (more than {MAX_CAPTION_CHARS})")
        texts.append(content or "")
    return texts


def _index(choice) -> int:
    index = choice.get("index", 0) if isinstance(choice, dict) else 0
    return index if isinstance(index, int) else 0
