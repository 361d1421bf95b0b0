"""The caption stage's work loop: build the backend (and the optional CLIP scorer), stream image
batches from DataLoader workers, clean/score/filter captions, write each shard when its last image
is done (parquet under a temporary name, rename, then the marker). See stages/caption/__init__.py."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from captioning.base import CaptionBatchResult, CaptionerError, RuntimeOptions, get_captioner
from captioning.cleanup import clean, clean_captions, cleaned_text
from shards.atomic import remove_orphans
from shards.captions import DroppedCaption, write_caption_shard
from shards.identity import file_sha256
from shards.markers import remove_marker
from stages.base import RunContext, UnitPlan
from stages.caption.images import image_batches
from stages.errors import ShardError, StageConfigError
from stages.layout import RunLayout

log = logging.getLogger(__name__)


def model_identity(cfg) -> dict[str, Any]:
    """What names the weights and the bank: names as written, plus content hashes of local files."""
    pretrained = cfg.retrieval.pretrained if cfg.retrieval else None
    identity = {"model": cfg.model, "pretrained": pretrained}
    files = {
        "pretrained": pretrained,
        "score_with": cfg.scoring.pretrained,
        "bank": cfg.retrieval and str(cfg.retrieval.bank),
    }
    for name, value in files.items():
        if value and Path(value).is_file():
            identity[f"{name}_sha256"] = file_sha256(Path(value))
    return identity


def _clip(spec_model: str, pretrained: str | None, config_dir, cfg):
    from captioning.clip_models import load_clip

    return load_clip(spec_model, pretrained, config_dir, cfg.device, cfg.dtype)


def build_captioner(cfg, ctx: RunContext, identity: dict[str, Any]):
    """The backend named in the config; errors become StageConfigError with the cause. `identity` is
    the model identity already in the stage's settings (file hashes are not computed twice)."""
    runtime = RuntimeOptions(cfg.device, cfg.dtype)
    try:
        if cfg.backend == "alt_text":
            return get_captioner("alt_text")
        if cfg.backend == "server":  # `serving` (server_process.py) has filled in a started server's endpoint
            return get_captioner(
                "server", model=cfg.model, k=cfg.k, generation=cfg.generation, server=cfg.server
            )
        if cfg.backend != "retrieval":
            return get_captioner(
                cfg.backend, model=cfg.model, k=cfg.k, generation=cfg.generation, runtime=runtime
            )
        from stages.caption.bank import bank_fingerprint, prepare_bank, prepare_index

        section = cfg.retrieval
        clip = _clip(cfg.model, section.pretrained, section.config_dir, cfg)
        cache = RunLayout(ctx.root).caption_bank(bank_fingerprint(identity))
        bank = prepare_bank(section, clip, cache, ctx.rank, ctx.world_size, ctx.is_main)
        approximate = prepare_index(section, bank, ctx.rank, ctx.seed) if section.index == "ivfpq" else None
        return get_captioner(
            "retrieval", clip=clip, bank=bank, k=cfg.k, options=section, approximate=approximate
        )
    except CaptionerError as err:
        raise StageConfigError(f"caption: {err}") from err


def _scorer(cfg):
    if cfg.scoring.model is None:
        return None
    try:
        return _clip(cfg.scoring.model, cfg.scoring.pretrained, cfg.scoring.config_dir, cfg)
    except CaptionerError as err:
        raise StageConfigError(f"caption.scoring: {err}") from err


class _ShardWriter:
    """Collects rows per shard and writes a shard once its end-of-shard item has arrived."""

    def __init__(
        self, cfg, plan: UnitPlan, out: Path, model_name: str, prompts: list[str], seed: int, progress
    ):
        self.cfg, self.plan, self.out, self.progress = cfg, plan, out, progress
        self.constant = {"backend": cfg.backend, "model": model_name, "prompts": prompts, "seed": seed}
        self.rows: dict[str, list[dict]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.last_error: str | None = None
        self.replacing: set[str] = set()  # done units rewritten by --retry-failed

    def add(
        self,
        unit: str,
        key: str,
        captions: list[str],
        scores: list[float] | None,
        corrupt: bool,
        failure: str | None = None,
    ) -> None:
        failure = failure or getattr(captions, "failed", None)  # see `image_results`
        dropped = [vars(d) for d in getattr(captions, "dropped", ())]  # see `_Kept`
        row = {"key": key, "captions": list(captions), "scores": scores, **self.constant, "dropped": dropped}
        self.add_row(unit, {**row, "failure": failure}, corrupt)

    def add_row(self, unit: str, row: dict, corrupt: bool) -> None:
        """A whole row (also one kept from the shard as written before, by --retry-failed)."""
        self.rows.setdefault(unit, []).append(row)
        counts = self.counts.setdefault(
            unit, {"images": 0, "captions": 0, "images_without_captions": 0, "corrupt_images": 0}
        )
        counts["images"] += 1
        counts["captions"] += len(row["captions"])
        counts["images_without_captions"] += not row["captions"]
        counts["corrupt_images"] += corrupt
        if self.cfg.backend == "server":  # backends that fail per image: count, keep the last reason
            counts["failed_requests"] = counts.get("failed_requests", 0) + bool(row.get("failure"))
            self.last_error = row.get("failure") or self.last_error

    def finish(self, unit: str, expected: int) -> None:
        rows = self.rows.pop(unit, [])
        counts = self.counts.pop(
            unit, {"images": 0, "captions": 0, "images_without_captions": 0, "corrupt_images": 0}
        )
        if len(rows) != expected:
            raise RuntimeError(f"caption shard {unit}: {len(rows)} rows for {expected} images")
        failed, limit = counts.get("failed_requests", 0), getattr(self.cfg.server, "max_failed_fraction", 1)
        if failed > limit * expected:
            raise ShardError(
                f"caption shard {unit}: {failed} of {expected} images failed on the server "
                f"(max_failed_fraction {limit:g}); last error: {self.last_error}"
            )
        path = self.out / f"{unit}.parquet"
        if unit in self.replacing:  # marker first: a crash in between leaves the unit pending, not damaged
            remove_marker(self.out, unit)
        write_caption_shard(path, rows)
        self.plan.mark_done(unit, {"counts": counts, "parquet_sha256": file_sha256(path)}, outputs=[path])
        self.progress.update(1)


def caption_units(cfg, ctx: RunContext, plan: UnitPlan, layout: RunLayout, retry: dict | None = None) -> None:
    """Caption `plan.mine`, and with `retry` (unit -> {key: row kept}, from --retry-failed) send the
    images of those done units again whose rows are not kept, rewriting their shards."""
    out, retry = plan.stage_dir, retry or {}
    units = plan.mine + [u for u in retry if u not in plan.mine]
    for unit in units:  # only this rank's units: other ranks may be writing theirs right now
        remove_orphans(out, unit)
        remove_orphans(out / "_done", unit)
    captioner, scorer = build_captioner(cfg, ctx, plan.settings["model_identity"]), _scorer(cfg)
    seed = plan.settings["seed"]
    transforms = [captioner.image_transform()] + ([scorer.preprocess] if scorer else [])
    decode_size = max([captioner.input_size] + ([scorer.image_size] if scorer else []))
    loader = image_batches(
        [(u, layout.image_tar(u)) for u in units],
        transforms,
        decode_size,
        cfg.batch_size,
        cfg.num_workers,
    )
    bar = tqdm(total=len(units), desc=f"caption[{cfg.caption_set}]", unit="shard", disable=not ctx.is_main)
    with bar as progress:  # closed before an error is printed, so the error is the last line
        writer = _ShardWriter(cfg, plan, out, captioner.model_name, list(captioner.prompts), seed, progress)
        writer.replacing = set(retry)
        if getattr(captioner, "streams", False):
            from stages.caption.streaming import stream_units

            return stream_units(cfg, captioner, scorer, loader, seed, writer, retry)
        for items, images, results in _captioned_batches(cfg, captioner, scorer, loader, seed):
            for item, (captions, scores) in zip(images, results):
                writer.add(item["unit"], item["key"], captions, scores, not item["ok"])
            for item in items:
                if item.get("end"):
                    writer.finish(item["unit"], item["count"])


def _captioned_batches(cfg, captioner, scorer, loader, seed: int):
    """(batch items, its images, (captions, scores) per image) per loader batch, in loader order.

    The retrieval backend embeds each batch at once but searches the bank once per
    `retrieval.query_batch` images: every search streams the whole bank, so searching each
    128-image batch alone would read an 11M-caption bank ~30x as often. Results do not change
    (an image's captions do not depend on the other images searched with it)."""
    if not hasattr(captioner, "caption_embeddings"):
        for batch in loader:
            images = [item for item in batch["items"] if not item.get("end")]
            yield (
                batch["items"],
                images,
                _caption_batch(cfg, captioner, scorer, images, batch["tensors"], seed),
            )
        return
    pending, waiting = [], 0
    for batch in loader:
        images = [item for item in batch["items"] if not item.get("end")]
        ok = [item for item in images if item["ok"]]
        embeddings = captioner.encode(batch["tensors"][0]) if ok else None
        scorer_embeddings = scorer.encode_images(batch["tensors"][1]) if scorer and ok else None
        pending.append((batch["items"], images, ok, embeddings, scorer_embeddings))
        waiting += len(ok)
        if waiting >= cfg.retrieval.query_batch:
            yield from _search_pending(cfg, captioner, scorer, pending)
            pending, waiting = [], 0
    yield from _search_pending(cfg, captioner, scorer, pending)


def _search_pending(cfg, captioner, scorer, pending: list[tuple]):
    """One bank search for the pending batches' images, then each batch's results as it came."""
    found = [p[3] for p in pending if p[3] is not None]
    raw = captioner.caption_embeddings(np.concatenate(found)) if found else None
    start = 0
    for items, images, ok, _, scorer_embeddings in pending:
        part = None
        if ok:
            stop = start + len(ok)
            part = CaptionBatchResult(raw.captions[start:stop], raw.scores[start:stop], raw.prompts)
            start = stop
        yield items, images, image_results(cfg, scorer, images, ok, part, scorer_embeddings)


def _caption_batch(
    cfg, captioner, scorer, items: list[dict], tensors: list[torch.Tensor], seed: int
) -> list[tuple[list[str], list[float] | None]]:
    """(captions, scores) per item; corrupt items get ([], [] or None). `tensors` hold what the
    workers made of the decodable items: [0] the captioner's inputs (stacked pixels, or a VLM
    processor's batch output), [1] the scorer's pixels."""
    ok = [item for item in items if item["ok"]]
    raw = scorer_embeddings = None
    if ok:
        torch.manual_seed(_batch_seed(seed, ok[0]["key"]))
        raw = captioner.caption(tensors[0], [item["alt"] for item in ok])
        scorer_embeddings = scorer.encode_images(tensors[1]) if scorer else None
    return image_results(cfg, scorer, items, ok, raw, scorer_embeddings)


def image_results(
    cfg, scorer, items: list[dict], ok: list[dict], raw: CaptionBatchResult | None, scorer_embeddings
):
    """Score (with the scorer's image embeddings, when there is a scorer), clean and filter the
    captions of the decodable items `ok`; the others get ([], [] or None)."""
    results: dict[str, tuple[list[str], list[float] | None]] = {}
    if ok:
        scores = _scores(scorer, scorer_embeddings, raw)
        for i, item in enumerate(ok):
            results[item["key"]] = _filtered(
                cfg, raw.captions[i], scores[i] if scores is not None else None, raw
            )
            if raw.failed:
                results[item["key"]][0].failed = raw.failed[i]
    return [results.get(item["key"], ([], [] if cfg.has_scores else None)) for item in items]


def _batch_seed(seed: int, first_key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{first_key}".encode()).digest()[:4], "little")


def _scores(
    scorer, image_embeddings: torch.Tensor | None, raw: CaptionBatchResult
) -> list[list[float]] | None:
    if scorer is None:
        return raw.scores
    flat = [text for captions in raw.captions for text in captions]
    text_embeddings = (
        torch.from_numpy(scorer.encode_texts(flat)) if flat else torch.zeros(0, image_embeddings.shape[1])
    )
    scores, start = [], 0
    for i, captions in enumerate(raw.captions):
        block = text_embeddings[start : start + len(captions)]
        scores.append((block @ image_embeddings[i]).tolist())
        start += len(captions)
    return scores


class _Kept(list):
    """The captions `_filtered` keeps; `.dropped` holds the ones it removed, with the reason, for the
    shard's optional `dropped` column (`_ShardWriter.add` reads it)."""

    dropped: list[DroppedCaption]


def _filtered(cfg, captions: list[str], scores: list[float] | None, raw: CaptionBatchResult):
    """Clean, drop below min_score, order best first when scored, keep the top n; what was removed
    and why rides along as `.dropped` on the returned captions."""
    dropped = _cleanup_drops(cfg, captions, scores, raw.prompts)
    texts, kept_scores = clean(captions, scores, raw.prompts, cfg.filter.min_words, cfg.filter.dedupe)
    if kept_scores is not None:
        min_score = cfg.scoring.min_score
        pairs = [(t, s) for t, s in zip(texts, kept_scores) if min_score is None or s >= min_score]
        low = [(t, s) for t, s in zip(texts, kept_scores) if min_score is not None and s < min_score]
        dropped += [DroppedCaption(t, s, f"below min_score {min_score:g}") for t, s in low]
        pairs.sort(key=lambda pair: -pair[1])
        texts, kept_scores = [t for t, _ in pairs], [s for _, s in pairs]
    limit = cfg.scoring.keep_top or cfg.k
    beyond = f"beyond {'keep_top' if cfg.scoring.keep_top else 'captions_per_image'} {limit}"
    extra = kept_scores[limit:] if kept_scores is not None else [None] * len(texts[limit:])
    dropped += [DroppedCaption(t, s, beyond) for t, s in zip(texts[limit:], extra)]
    kept = _Kept(texts[:limit])
    kept.dropped = dropped
    return kept, (kept_scores[:limit] if kept_scores is not None else None)


def _cleanup_drops(cfg, captions: list[str], scores: list[float] | None, prompts) -> list[DroppedCaption]:
    """The captions `clean` removes, each with its reason (too short or a duplicate)."""
    keep = set(clean_captions(captions, prompts, cfg.filter.min_words, cfg.filter.dedupe))
    words = max(cfg.filter.min_words, 1)
    dropped = []
    for i in sorted(set(range(len(captions))) - keep):
        text = cleaned_text(captions[i], prompts)
        reason = (
            "duplicate"
            if len(text.split()) >= words
            else ("empty" if not text else f"fewer than {words} words")
        )
        dropped.append(DroppedCaption(text, scores[i] if scores is not None else None, reason))
    return dropped
