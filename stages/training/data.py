"""Training data: image shards joined with a caption set by key, in a deterministic, resumable order.

Reads  `images/<shard>.tar` (random access through each member's offset) and
       `captions/<set>/<shard>.parquet` (loaded per shard; its keys must equal the tar's keys).
Yields per sample: image tensor, class index (`.cls`, -1 without one), up to k captions tokenised
       `[k, context]` with a mask `[k]`.

The order of an epoch is a permutation of all samples seeded by (seed, epoch), cut into global
batches: step s trains on positions [s*G, (s+1)*G) of it, whatever the number of processes W and the
gradient accumulation A (G = micro batch B x W x A). Within a step, micro step a of rank r takes the
B positions starting at s*G + (a*W + r)*B. So the samples of a step depend on the step alone: a run
resumed from step S on another number of processes starts at position S*G and sees every sample of
the epoch exactly once across the change. Augmentations are seeded per (seed, epoch, index), so they
do not depend on the rank or DataLoader worker that produced the sample.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from shards.captions import CaptionShardError, read_caption_shard
from shards.tars import file_members
from stages.errors import ShardError
from stages.layout import RunLayout


def train_transform(size: int, mean, std) -> Callable:
    """METHOD.md: resize to a square of 1.125*S, random crop S, horizontal flip, colour jitter 0.4."""
    return T.Compose(
        [
            T.Resize((round(1.125 * size),) * 2, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomCrop(size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.4, 0.4, 0.4),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(size: int, mean, std) -> Callable:
    """Same resize, centre crop S."""
    return T.Compose(
        [
            T.Resize((round(1.125 * size),) * 2, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


TOKEN_CACHE_SIZE = 100_000  # captions per worker: at most ~60 MB of int64 tokens at context 77


@dataclass(frozen=True)
class SampleRef:
    tar: Path
    key: str
    jpg_offset: int
    jpg_size: int
    cls: int
    captions: tuple[str, ...]
    alt_text: str = ""


def _tar_members(tar: Path) -> tuple[list[str], dict[str, tuple[int, int]], dict[str, int], dict[str, str]]:
    """Keys in file order, (offset, size) of each key's jpg, each key's class (.cls) and alt text (.txt)."""
    keys, jpgs, classes, alts = [], {}, {}, {}
    try:
        with tarfile.open(tar, "r:") as archive:
            for member in file_members(archive, tar):
                key, _, ext = member.name.partition(".")
                if ext == "jpg":
                    keys.append(key)
                    jpgs[key] = (member.offset_data, member.size)
                elif ext == "cls":
                    classes[key] = int(archive.extractfile(member).read())
                elif ext == "txt":
                    alts[key] = archive.extractfile(member).read().decode("utf-8", "replace")
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise ShardError(f"{tar}: damaged image shard ({err}); `run --repair` redoes it") from None
    return keys, jpgs, classes, alts


def index_samples(root: Path, units: list[str], caption_set: str | None) -> list[SampleRef]:
    """Every sample of the units, joined with its captions (none when `caption_set` is None)."""
    layout, refs = RunLayout(root), []
    for unit in units:
        tar = layout.image_tar(unit)
        keys, jpgs, classes, alts = _tar_members(tar)
        captions = {key: () for key in keys}
        if caption_set is not None:
            try:
                rows = read_caption_shard(layout.caption_shard(caption_set, unit), keys)
            except CaptionShardError as err:
                raise ShardError(str(err)) from None
            captions = {key: row.captions for key, row in rows.items()}
        refs += [SampleRef(tar, k, *jpgs[k], classes.get(k, -1), captions[k], alts.get(k, "")) for k in keys]
    return refs


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_positions(
    order: np.ndarray, rank: int, world_size: int, micro_batch: int, global_batch: int, start_step: int = 0
) -> np.ndarray:
    """This rank's sample indexes for the epoch from global step `start_step` on, micro batch after
    micro batch; the epoch is cut to whole global batches (the module docstring has the layout)."""
    steps = len(order) // global_batch
    grid = order[: steps * global_batch].reshape(steps, -1, world_size, micro_batch)  # [step, A, W, B]
    return grid[start_step:, :, rank, :].reshape(-1)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()[:8], "little") % (2**63)


class CaptionedImages(Dataset):
    """Map-style dataset over `SampleRef`s: the DataLoader's sampler decides the order."""

    def __init__(self, refs: list[SampleRef], transform: Callable, tokenizer, k: int, seed: int) -> None:
        self.refs, self.transform, self.tokenizer, self.k, self.seed = refs, transform, tokenizer, k, seed
        self.epoch = 0
        self._token_cache: dict[str, torch.Tensor] = {}

    def _tokens(self, caption: str) -> torch.Tensor:
        """Tokenised once per worker: retrieved captions repeat across images (one bank), and BPE
        costs ~70 us per caption, about as much as decoding the image when k = 20."""
        tokens = self._token_cache.get(caption)
        if tokens is None:
            if len(self._token_cache) >= TOKEN_CACHE_SIZE:
                self._token_cache.clear()
            tokens = self._token_cache[caption] = self.tokenizer([caption])[0]
        return tokens

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> dict:
        ref = self.refs[index]
        with open(ref.tar, "rb") as handle:
            handle.seek(ref.jpg_offset)
            image = Image.open(io.BytesIO(handle.read(ref.jpg_size))).convert("RGB")
        torch.manual_seed(_sample_seed(self.seed, self.epoch, index))  # augmentations per sample
        captions = list(ref.captions[: self.k])
        tokens = torch.zeros(self.k, self.tokenizer.context_length, dtype=torch.long)
        if captions:
            tokens[: len(captions)] = torch.stack([self._tokens(c) for c in captions])
        mask = torch.arange(self.k) < len(captions)
        return {
            "image": self.transform(image),
            "cls": ref.cls,
            "tokens": tokens,
            "mask": mask,
            "index": index,
        }


class EmbeddedTexts(Dataset):
    """(frozen image embedding, tokenised text) pairs for re-alignment; same epoch order rules."""

    def __init__(self, embeddings: np.ndarray, texts: list[str], tokenizer, seed: int) -> None:
        self.embeddings, self.texts, self.tokenizer, self.seed = embeddings, texts, tokenizer, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict:
        return {
            "emb": torch.from_numpy(self.embeddings[index]),
            "tokens": self.tokenizer([self.texts[index]])[0],
            "index": index,
        }


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGUSR1/SIGTERM to the main process, which checkpoints and then stops them; a
    signal sent to the whole process group (srun, scancel) must not kill a worker mid-batch."""
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def epoch_loader(
    dataset: CaptionedImages | EmbeddedTexts,
    epoch: int,
    rank: int,
    world_size: int,
    micro_batch: int,
    global_batch: int,
    start_step: int = 0,
    workers: int = 2,
) -> DataLoader:
    """Micro batches of this rank's share of the epoch, from global step `start_step` on."""
    dataset.epoch = epoch
    order = epoch_order(len(dataset), dataset.seed, epoch)
    positions = rank_positions(order, rank, world_size, micro_batch, global_batch, start_step)
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=positions.tolist(),
        num_workers=workers,
        drop_last=True,
        persistent_workers=False,
        worker_init_fn=_ignore_stop_signals if workers else None,
    )


def loaders(dataset, engine, micro_batch: int, global_batch: int, workers: int):
    """`batches(epoch, start_step) -> DataLoader` of this engine's rank, for the training loop."""

    def batches(epoch: int, start: int) -> DataLoader:
        return epoch_loader(
            dataset, epoch, engine.rank, engine.world_size, micro_batch, global_batch, start, workers
        )

    return batches


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    return num_samples // global_batch
