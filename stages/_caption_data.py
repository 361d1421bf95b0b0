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


class ShardImages(IterableDataset):
    def __init__(self, shards: list[tuple[str, Path]], transforms: list[Callable]) -> None:
        super().__init__()
        self.shards, self.transforms = shards, transforms

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        mine = self.shards[worker.id::worker.num_workers] if worker else self.shards
        for unit, path in mine:
            count = 0
            for sample in iter_samples([path]):
                count += 1
                yield self._item(unit, sample)
            yield {"unit": unit, "end": True, "count": count}

    def _item(self, unit: str, sample: dict) -> dict:
        alt = sample.get("txt", b"").decode("utf-8", "replace")
        try:
            image = Image.open(io.BytesIO(sample["jpg"]))
            image = image.convert("RGB")
            tensors = [transform(image) for transform in self.transforms]
        except Exception as err:  # any undecodable image: counted, never fatal for the shard
            log.debug("shard %s key %s: cannot decode image (%s)", unit, sample["__key__"], err)
            return {"unit": unit, "key": sample["__key__"], "ok": False, "alt": alt}
        return {"unit": unit, "key": sample["__key__"], "ok": True, "tensors": tensors, "alt": alt}


def _as_list(items: list[dict]) -> list[dict]:
    return items


def image_batches(shards: list[tuple[str, Path]], transforms: list[Callable], batch_size: int,
                  workers: int) -> DataLoader:
    """Batches (lists of items) in shard order per worker; tensors stay per item until stacked."""
    workers = min(workers, len(shards))
    return DataLoader(ShardImages(shards, transforms), batch_size=batch_size, num_workers=workers,
                      collate_fn=_as_list, prefetch_factor=4 if workers else None,
                      persistent_workers=False)


def stack(items: list[dict], which: int) -> torch.Tensor:
    return torch.stack([item["tensors"][which] for item in items])
