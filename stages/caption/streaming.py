"""The caption stage's loop for a streaming backend (`server`, captioning/server.py): a window of
images in flight, fed continuously across loader batches and shards, and each shard written (by the
stage's `_ShardWriter`: same rows, order, files and markers as the batch loop) as soon as its last
image is answered. A slow image holds back only its own shard's write, never the next requests.

Memory: the window (`captioner.window` images, data URLs included) plus the rows of the shards still
open, which the window bounds too (an open shard waits for an image in flight).

`--retry-failed` (`failed_rows`): the rows of this rank's done shards whose images failed on the
server are sent again; the other rows are kept as written, and the shard is rewritten whole.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from captioning.base import CaptionBatchResult
from shards.captions import CaptionShardError, read_rows
from shards.naming import rank_split
from stages.base import RunContext, UnitPlan
from stages.errors import ShardError

log = logging.getLogger(__name__)

POLL_S = 0.5  # waiting for answers wakes up this often, so Ctrl-C / SIGUSR1 are seen


@dataclass
class _Image:
    item: dict
    embedding: torch.Tensor | None = None  # the scorer's image embedding
    kept: dict | None = None  # --retry-failed: the row as written before
    outcome: Any = None  # captions, or the client's Failure


@dataclass
class _Shard:
    images: list[_Image] = field(default_factory=list)
    expected: int | None = None  # images in the tar, known from its end-of-shard item
    waiting: int = 0

    @property
    def is_complete(self) -> bool:
        return self.expected is not None and self.waiting == 0


class _Stream:
    def __init__(self, cfg, captioner, scorer, seed: int, writer, retry: dict[str, dict[str, dict]]):
        self.cfg, self.captioner, self.scorer, self.seed = cfg, captioner, scorer, seed
        self.writer, self.retry = writer, retry
        self.shards: dict[str, _Shard] = {}
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        self.in_flight = 0

    def add_batch(self, batch: dict) -> None:
        ok = [item for item in batch["items"] if item.get("ok")]
        urls = batch["tensors"][0] if ok else []
        embeddings = self.scorer.encode_images(batch["tensors"][1]) if self.scorer and ok else None
        position = {item["key"]: i for i, item in enumerate(ok)}
        for item in batch["items"]:
            shard = self.shards.setdefault(item["unit"], _Shard())
            if item.get("end"):
                shard.expected = item["count"]
                continue
            image = _Image(item, kept=self.retry.get(item["unit"], {}).get(item["key"]))
            shard.images.append(image)
            if not item["ok"] or image.kept is not None:
                continue
            i = position[item["key"]]
            image.embedding = embeddings[i] if embeddings is not None else None
            while self.in_flight >= self.captioner.window:
                self.settle_one()
            future = self.captioner.submit(urls[i], self.captioner.image_seeds(self.seed, item["key"]))
            shard.waiting += 1
            self.in_flight += 1
            future.add_done_callback(lambda f, s=shard, im=image: self.answers.put((s, im, f)))
        while not self.answers.empty():
            self.settle_one()
        self.write_complete()

    def settle_one(self) -> None:
        """Wait for one answer and file it under its image."""
        while True:
            try:
                shard, image, future = self.answers.get(timeout=POLL_S)
                break
            except queue.Empty:
                continue
        image.outcome = self.captioner.check(future.result())  # a lost server stops the stage here
        shard.waiting -= 1
        self.in_flight -= 1

    def finish(self) -> None:
        while self.in_flight:
            self.settle_one()
            self.write_complete()
        self.write_complete()
        if self.shards:
            raise RuntimeError(f"caption shards left open: {sorted(self.shards)}")

    def write_complete(self) -> None:
        for unit in [u for u, shard in self.shards.items() if shard.is_complete]:
            self._write(unit, self.shards.pop(unit))

    def _write(self, unit: str, shard: _Shard) -> None:
        from stages.caption.work import image_results

        cfg, sent = self.cfg, [im for im in shard.images if im.outcome is not None]
        results = []
        if sent:
            raw = CaptionBatchResult(
                [o if isinstance(o, list) else [] for o in (im.outcome for im in sent)],
                prompts=[],
                failed=[None if isinstance(im.outcome, list) else str(im.outcome) for im in sent],
            )
            embeddings = torch.stack([im.embedding for im in sent]) if self.scorer else None
            items = [im.item for im in sent]
            results = image_results(cfg, self.scorer, items, items, raw, embeddings)
        answered = iter(results)
        for image in shard.images:
            item = image.item
            if image.kept is not None:
                self.writer.add_row(unit, image.kept, not item["ok"])
            elif not item["ok"]:
                self.writer.add(unit, item["key"], [], [] if cfg.has_scores else None, True)
            else:
                captions, scores = next(answered)
                self.writer.add(unit, item["key"], captions, scores, False)
        self.writer.finish(unit, shard.expected)


def stream_units(
    cfg, captioner, scorer, loader, seed: int, writer, retry: dict[str, dict[str, dict]]
) -> None:
    """Caption every image the loader brings, a window at a time; see the module docstring."""
    stream = _Stream(cfg, captioner, scorer, seed, writer, retry)
    try:
        for batch in loader:
            stream.add_batch(batch)
        stream.finish()
        log.debug("caption: requests per endpoint %s", captioner.requests_sent())
    finally:
        captioner.close()


def failed_rows(plan: UnitPlan, ctx: RunContext) -> dict[str, dict[str, dict]]:
    """For --retry-failed: this rank's done units with failed images, each with the rows to keep
    (by key): every row whose image did not fail."""
    retry = {}
    for unit in rank_split(plan.units, ctx.rank, ctx.world_size):
        marker = plan.done.get(unit)
        if not marker or not marker.get("counts", {}).get("failed_requests"):
            continue
        path = Path(plan.stage_dir) / f"{unit}.parquet"
        try:
            rows = read_rows(path)
        except CaptionShardError as err:
            raise ShardError(str(err)) from None
        retry[unit] = {row["key"]: row for row in rows if not row["failure"]}
    return retry
