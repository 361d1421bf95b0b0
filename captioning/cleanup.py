"""Caption cleanup shared by every backend: whitespace, prompt echo, empty, too short, duplicates."""

from __future__ import annotations

import re

_SPACES = re.compile(r"\s+")


def strip_prompt(caption: str, prompts: list[str]) -> str:
    """Drop a prompt the model echoed at the start of its output (case-insensitive)."""
    text = caption.strip()
    for prompt in sorted(prompts, key=len, reverse=True):
        if prompt and text.lower().startswith(prompt.strip().lower()):
            return text[len(prompt.strip()) :].strip()
    return text


def clean_captions(
    captions: list[str], prompts: list[str] = (), min_words: int = 1, dedupe: bool = True
) -> list[int]:
    """Indexes of the captions to keep, in order, after cleaning; see `cleaned_text`."""
    kept, seen = [], set()
    for i, caption in enumerate(captions):
        text = cleaned_text(caption, prompts)
        if len(text.split()) < max(min_words, 1):
            continue
        if dedupe and text in seen:
            continue
        seen.add(text)
        kept.append(i)
    return kept


def cleaned_text(caption: str, prompts: list[str] = ()) -> str:
    """Whitespace folded and the prompt echo removed."""
    return _SPACES.sub(" ", strip_prompt(caption, list(prompts))).strip()


def clean(
    captions: list[str],
    scores: list[float] | None,
    prompts: list[str] = (),
    min_words: int = 1,
    dedupe: bool = True,
) -> tuple[list[str], list[float] | None]:
    """Cleaned captions (and their scores, kept aligned)."""
    keep = clean_captions(captions, prompts, min_words, dedupe)
    texts = [cleaned_text(captions[i], prompts) for i in keep]
    return texts, ([scores[i] for i in keep] if scores is not None else None)
