"""Embeddings for evaluation: images through DataLoader workers (decode + the model's own eval
transform), texts in batches; cached as `.npy` with a sidecar naming what made them.

A cache file is reused only when its sidecar matches (model identity, image set identity, image
size), so evaluating several models, or re-running after one changed, embeds each pair once; a
damaged cache file (cut off by a crash) is computed again. An undecodable picture is an error naming it.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from shards.atomic import atomic_write, write_json_atomic
from stages.errors import ShardError
from stages.evaluate.datasets import ImageSet

log = logging.getLogger(__name__)


class UndecodableImage(ValueError):
    """An evaluation picture PIL cannot read (raised in a DataLoader worker, re-raised by torch)."""


class _Pictures(Dataset):
    def __init__(self, images: ImageSet, transform) -> None:
        self.refs, self.transform = images.refs, transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> torch.Tensor:
        ref = self.refs[index]
        try:
            image = Image.open(io.BytesIO(ref.read())).convert("RGB")
        except (OSError, ValueError) as err:  # PIL's errors for unreadable images
            raise UndecodableImage(f"cannot decode image {ref.path} (offset {ref.offset}): {err}") from None
        return self.transform(image)


def embed_images(clip, images: ImageSet, batch_size: int = 256, num_workers: int = 2) -> np.ndarray:
    loader = DataLoader(
        _Pictures(images, clip.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        persistent_workers=False,
    )
    try:
        chunks = [
            clip.encode_images(batch).numpy()
            for batch in tqdm(loader, desc=f"embed {images.name}", unit="batch", leave=False)
        ]
    except UndecodableImage as err:  # from a worker, torch adds its traceback: keep our line only
        line = next(part for part in str(err).splitlines()[::-1] if "cannot decode image" in part)
        raise ShardError(
            f"{images.name}: {line.split('UndecodableImage: ')[-1]}; remove or replace it"
        ) from None
    return np.concatenate(chunks).astype(np.float32)


def _sidecar(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def cached(path: Path, about: dict, make) -> np.ndarray:
    """`make()` once per `about`: the array is renamed into place before its sidecar is written."""
    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists() and _sidecar(sidecar) == about:
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError) as err:  # cut off or rewritten: made again
            log.warning("%s: damaged cache (%s); computing it again", path, err)
    array = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        np.save(handle, array)
    write_json_atomic(sidecar, about)
    return array
