"""Image shards -> batches for the caption and index stages, decoded in DataLoader workers.

Each worker takes whole shards (`shards[worker::workers]`) and makes batches of one shard each (the
shard's images in order, `batch_size` at a time; the last batch of a shard also carries its
end-of-shard item): an image's batch, and so its embedding down to the last bit, does not depend on
which other shards are pending (a resumed run gives the same result). Per image a batch holds its
key, the backend's tensor(s) and the alt text; a corrupt image comes with `ok=False` instead of
tensors, so it is counted and gets an empty caption list.

A transform is either per picture (PIL image -> tensor; the batch gets them stacked) or, when it has
`batched = True`, called once per batch on the list of pictures (a VLM processor, which pads and tiles
pictures of different sizes together as its model expects); both run in the worker, so only tensors
cross to the main process. A transform with `encoded = True` gets the image file's bytes as stored,
undecoded (the server backend's data URLs); a batch gets the list of what it returned.

`read_shard(path)` gives a shard's samples (webdataset's reader by default). When what it returns
has an `info` attribute, its value once the samples are read rides on the end-of-shard item as
`info`: per-shard work done in the worker that the main process would otherwise do between batches
(the index stage reads each tar's headers and pictures in one pass and sends its metadata so).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

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
    def __init__(
        self,
        shards: list[tuple[str, Path]],
        transforms: list[Callable],
        decode_size: int,
        batch_size: int,
        read_shard: Callable[[Path], Iterable[dict]] | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.transforms, self.decode_size = shards, transforms, decode_size
        self.batch_size, self.read_shard = batch_size, read_shard or _webdataset_shard

    def __iter__(self) -> Iterator[dict]:
        """Collated batches, never across shards."""
        worker = get_worker_info()
        mine = self.shards[worker.id :: worker.num_workers] if worker else self.shards
        for unit, path in mine:
            batch, count, samples = [], 0, self.read_shard(path)
            for sample in samples:
                count += 1
                batch.append(self._item(unit, sample))
                if len(batch) == self.batch_size:
                    yield self.collate(batch)
                    batch = []
            end = {"unit": unit, "end": True, "count": count}
            if hasattr(samples, "info"):
                end["info"] = samples.info
            yield self.collate(batch + [end])

    def _item(self, unit: str, sample: dict) -> dict:
        alt = sample.get("txt", b"").decode("utf-8", "replace")
        try:
            # an `encoded` transform takes the file's bytes as stored (a server backend's data URL)
            decoded = not all(_encoded(t) for t in self.transforms)
            image = decode_image(sample["jpg"], self.decode_size) if decoded else None
            tensors = [
                t(sample["jpg"]) if _encoded(t) else None if _batched(t) else t(image)
                for t in self.transforms
            ]
        except Exception as err:  # any undecodable image: counted, never fatal for the shard
            log.debug("shard %s key %s: cannot decode image (%s)", unit, sample["__key__"], err)
            return {"unit": unit, "key": sample["__key__"], "ok": False, "alt": alt}
        item = {"unit": unit, "key": sample["__key__"], "ok": True, "tensors": tensors, "alt": alt}
        if any(_batched(t) for t in self.transforms):
            item["image"] = image  # for the batch transform in `collate`; never leaves the worker
        return item

    def collate(self, items: list[dict]) -> dict:
        """In the worker: per transform, the stacked tensors of the decodable images or the batch
        transform's output, so a batch crosses to the main process as a few tensors."""
        ok = [item for item in items if item.get("ok")]
        try:
            tensors = self._tensors(ok)
        except Exception:  # a picture the processor cannot take: find it, count it as corrupt
            _mark_failing(ok, [t for t in self.transforms if _batched(t)])
            tensors = self._tensors([item for item in ok if item["ok"]])
        return {
            "items": [{k: v for k, v in item.items() if k not in ("tensors", "image")} for item in items],
            "tensors": tensors,
        }

    def _tensors(self, ok: list[dict]) -> list:
        return [_collated(t, i, ok) for i, t in enumerate(self.transforms)] if ok else []


def _webdataset_shard(path: Path) -> Iterator[dict]:
    return iter_samples([path])


def _batched(transform: Callable) -> bool:
    return getattr(transform, "batched", False)


def _encoded(transform: Callable) -> bool:
    return getattr(transform, "encoded", False)


def _collated(transform: Callable, index: int, ok: list[dict]):
    if _encoded(transform):
        return [item["tensors"][index] for item in ok]
    if _batched(transform):
        return transform([item["image"] for item in ok])
    return torch.stack([item["tensors"][index] for item in ok])


def _mark_failing(ok: list[dict], batch_transforms: list[Callable]) -> None:
    """Run the batch transforms on each picture alone; the ones they fail on get `ok=False`."""
    for item in ok:
        try:
            for transform in batch_transforms:
                transform([item["image"]])
        except Exception as err:
            log.warning("shard %s key %s: the processor fails on it (%s)", item["unit"], item["key"], err)
            item["ok"] = False


def image_batches(
    shards: list[tuple[str, Path]],
    transforms: list[Callable],
    decode_size: int,
    batch_size: int,
    workers: int,
    read_shard: Callable[[Path], Iterable[dict]] | None = None,
) -> DataLoader:
    """Batches `{"items": [...], "tensors": [...]}` of one shard each, in shard order per worker
    (see `collate`); the workers batch, so the loader passes them on as they are."""
    workers = min(workers, len(shards))
    return DataLoader(
        ShardImages(shards, transforms, decode_size, batch_size, read_shard),
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_made,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )


def _as_made(batch: dict) -> dict:
    return batch
