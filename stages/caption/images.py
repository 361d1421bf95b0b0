"""Image shards -> batches for the caption stage, decoded in DataLoader workers.

Each worker takes whole shards (`shards[worker::workers]`) and yields, per image, its key, the
backend's tensor(s) and the alt text, then one end-of-shard item; a corrupt image is yielded with
`ok=False` instead of tensors, so it is counted and gets an empty caption list.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.reader import iter_samples

log = logging.getLogger(__name__)


def decode_image(data: bytes, decode_size: int) -> Image.Image:
    """RGB image; a JPEG is scaled by 1/2, 1/4 or 1/8 while decoding when both sides stay >=
    `decode_size`: several times faster when the model looks at fewer pixels than the shard holds."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (decode_size, decode_size))
    return image.convert("RGB")


class ShardImages(IterableDataset):
    def __init__(self, shards: list[tuple[str, Path]], transforms: list[Callable], decode_size: int) -> None:
        super().__init__()
        self.shards, self.transforms, self.decode_size = shards, transforms, decode_size

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        mine = self.shards[worker.id :: worker.num_workers] if worker else self.shards
        for unit, path in mine:
            count = 0
            for sample in iter_samples([path]):
                count += 1
                yield self._item(unit, sample)
            yield {"unit": unit, "end": True, "count": count}

    def _item(self, unit: str, sample: dict) -> dict:
        alt = sample.get("txt", b"").decode("utf-8", "replace")
        try:
            image = decode_image(sample["jpg"], self.decode_size)
            tensors = [transform(image) for transform in self.transforms]
        except Exception as err:  # any undecodable image: counted, never fatal for the shard
            log.debug("shard %s key %s: cannot decode image (%s)", unit, sample["__key__"], err)
            return {"unit": unit, "key": sample["__key__"], "ok": False, "alt": alt}
        return {"unit": unit, "key": sample["__key__"], "ok": True, "tensors": tensors, "alt": alt}


def collate(items: list[dict]) -> dict:
    """In the worker: stack the tensors of the decodable images, one tensor per transform, so a
    batch crosses to the main process as a few tensors instead of one per image."""
    ok = [item for item in items if item.get("ok")]
    tensors = (
        [torch.stack([item["tensors"][i] for item in ok]) for i in range(len(ok[0]["tensors"]))] if ok else []
    )
    return {
        "items": [{k: v for k, v in item.items() if k != "tensors"} for item in items],
        "tensors": tensors,
    }


def image_batches(
    shards: list[tuple[str, Path]],
    transforms: list[Callable],
    decode_size: int,
    batch_size: int,
    workers: int,
) -> DataLoader:
    """Batches `{"items": [...], "tensors": [...]}` in shard order per worker (see `collate`)."""
    workers = min(workers, len(shards))
    return DataLoader(
        ShardImages(shards, transforms, decode_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
