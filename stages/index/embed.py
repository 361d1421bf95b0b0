"""The index stage's embedding loop: this rank's shards through DataLoader workers (decode + the
models' eval transform, stages/caption/images.py), every batch through every model, and per shard
`<model>/vectors/<shard>.npy` (fp16) and `meta/<shard>.parquet`, then its marker (last).

A shard's rows are its decodable pictures in tar order; an undecodable one is counted, not indexed.
Each tar is read once, by the DataLoader worker that takes it (`ShardPictures`): a pass over its
member headers gives each `.jpg`'s offset, the `.txt` alt text and the img2dataset `.json`'s url
(so a picture can later be read by key from its offset), then the pictures are read at those
offsets through one open file. The metadata rides to the main process on the shard's last batch.

The workers start before the models' weights load (their eval transform is built without them,
`eval_transform`), so the first batches are decoded meanwhile. The main process only runs the
models: a finished shard's files and marker are written by one background thread while the next
shard's batches are embedded (at most one shard waits to be written; the marker is still written
last, after its files, and a write's error stops the loop).
"""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from shards.atomic import atomic_write, remove_orphans
from shards.captions import ALT_TEXT, CaptionShardError, read_caption_shard
from shards.tables import write_parquet_atomic
from shards.tars import TruncatedTarError, file_members, split_member_name
from stages.base import RunContext, UnitPlan
from stages.errors import ShardError, StageConfigError
from stages.layout import RunLayout

log = logging.getLogger(__name__)

META_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("alt", pa.string()),
        ("caption", pa.string()),  # the best caption of the caption set (or the alt text), may be null
        ("captions", pa.list_(pa.string())),
        ("shard", pa.string()),
        ("offset", pa.int64()),  # of the .jpg member's data in the tar
        ("size", pa.int64()),
    ]
)
MAX_META_BYTES = 1 << 20  # a .txt/.json member larger than this is not read (hostile or not metadata)
MAX_PICTURE_BYTES = 64 << 20  # a .jpg member larger than this is counted as undecodable, never read


@dataclass
class Member:
    key: str
    offset: int
    size: int
    alt: str = ""
    url: str = ""


def meta_path(folder: Path, unit: str) -> Path:
    return Path(folder) / "meta" / f"{unit}.parquet"


def vectors_path(folder: Path, model: str, unit: str) -> Path:
    return Path(folder) / model / "vectors" / f"{unit}.npy"


def scan_tar(tar: Path) -> dict[str, Member]:
    """Every key's `.jpg` member: its offset and size, alt text and url, in file order. A sample
    without a picture, or with two, is a damaged shard (the download stage writes one each), as is
    any tar `file_members` refuses."""
    found: dict[str, Member] = {}
    extras: dict[str, dict[str, str]] = {}
    try:
        with tarfile.open(tar, "r:") as archive:
            for info in file_members(archive, tar):
                key, ext = split_member_name(info.name)
                if ext == "jpg":
                    if key in found:
                        raise _damaged(tar, f"sample {key!r} has two .jpg members")
                    found[key] = Member(key, info.offset_data, info.size)
                elif ext in ("txt", "json") and info.size <= MAX_META_BYTES:
                    extras.setdefault(key, {})[ext] = (
                        archive.extractfile(info).read().decode("utf-8", "replace")
                    )
                else:
                    extras.setdefault(key, {})
    except ShardError:  # ours, from inside the loop: already the one line
        raise
    except TruncatedTarError as err:
        raise _damaged(tar, str(err).removeprefix(f"{tar}: ")) from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise _damaged(tar, f"damaged image shard ({err})") from None
    missing = next((key for key in extras if key not in found), None)
    if missing is not None:
        raise _damaged(tar, f"sample {missing!r} has no .jpg member")
    for key, member in found.items():
        member.alt = extras.get(key, {}).get("txt", "")
        member.url = _url(extras.get(key, {}).get("json"))
    return found


def _damaged(tar: Path, what: str) -> ShardError:
    return ShardError(f"{tar}: {what}; `run --repair` redoes it")


class ShardPictures:
    """One image shard read once, in a DataLoader worker: `scan_tar`, then each picture at its
    offset. Once iterated, `info` is the members by key, or the one-line reason the shard cannot be
    indexed (torch would add the worker's traceback to a raised error)."""

    def __init__(self, tar: Path) -> None:
        self.tar, self.info = tar, None

    def __iter__(self) -> Iterator[dict]:
        try:
            members = scan_tar(self.tar)
            with open(self.tar, "rb") as handle:
                for key, member in members.items():
                    if member.size > MAX_PICTURE_BYTES:  # not read: counted as undecodable
                        yield {"__key__": key}
                        continue
                    handle.seek(member.offset)
                    data = handle.read(member.size)
                    if len(data) != member.size:
                        raise _damaged(self.tar, f"cut off inside {key}.jpg")
                    yield {"__key__": key, "jpg": data}
        except ShardError as err:
            self.info = str(err)
        except OSError as err:
            self.info = f"{self.tar}: cannot read the image shard ({err})"
        else:
            self.info = members


def _url(text: str | None) -> str:
    try:
        value = json.loads(text).get("url") if text else None
    except (json.JSONDecodeError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def load_models(cfg, root: Path) -> dict:
    """Every model of the config, by name (errors name the model)."""
    from captioning.base import CaptionerError
    from captioning.clip_models import load_clip
    from stages.evaluate import model_checkpoint

    models = {}
    for entry in cfg.models:
        try:
            models[entry.name] = load_clip(
                cfg.model, model_checkpoint(root, entry), cfg.config_dir, cfg.device
            )
        except CaptionerError as err:
            raise StageConfigError(f"index: model {entry.name!r}: {err}") from None
    return models


def _captions(
    cfg, root: Path, unit: str, keys: list[str], members: dict[str, Member]
) -> dict[str, list[str]]:
    if cfg.captions is None:
        return {key: [] for key in keys}
    if cfg.captions == ALT_TEXT:
        return {key: [members[key].alt] if members[key].alt.strip() else [] for key in keys}
    path = RunLayout(root).caption_shard(cfg.captions, unit)
    try:
        rows = read_caption_shard(path, list(members))
    except CaptionShardError as err:
        raise ShardError(str(err)) from None
    return {key: list(rows[key].captions) for key in keys}


class _ShardOutput:
    """Rows of one shard as its batches arrive; written when its end-of-shard item comes."""

    def __init__(self, models: list[str]) -> None:
        self.keys: list[str] = []
        self.vectors: dict[str, list[np.ndarray]] = {m: [] for m in models}
        self.corrupt = 0


def models_and_batches(cfg, root: Path, tars: dict[str, Path]) -> tuple[dict, Iterator[dict]]:
    """The models, and the batches of the shards. The DataLoader workers are started before the
    weights load, so they decode the first shards meanwhile, when the eval transform can be built
    without the weights and its config equals the loaded first model's; otherwise they start after."""
    from captioning.clip_models import eval_transform
    from stages.evaluate import model_checkpoint

    early = eval_transform(cfg.model, model_checkpoint(root, cfg.models[0]), cfg.config_dir)
    batches = iter(_loader(cfg, tars, early.preprocess, early.image_size)) if early else None
    try:
        models = load_models(cfg, root)
    except BaseException:
        batches = None  # its workers stop now, not when the traceback is collected
        raise
    first = next(iter(models.values()))
    loaded = (dict(first.model.visual.preprocess_cfg), first.image_size)
    if early is None or (early.config, early.image_size) != loaded:
        log.info("index: the DataLoader starts after the models loaded (%s)", cfg.model)
        batches = None  # the early workers stop before the new ones start
        batches = iter(_loader(cfg, tars, first.preprocess, first.image_size))
    return models, batches


def _loader(cfg, tars: dict[str, Path], preprocess, image_size: int):
    from stages.caption.images import image_batches

    shards, workers = list(tars.items()), cfg.num_workers
    return image_batches(shards, [preprocess], image_size, cfg.batch_size, workers, read_shard=ShardPictures)


def embed_shards(cfg, ctx: RunContext, plan: UnitPlan, tars: dict[str, Path]) -> None:
    folder = plan.stage_dir
    for unit in tars:  # temporary files a killed run left for this rank's units
        remove_orphans(folder / "meta", unit)
        for entry in cfg.models:
            remove_orphans(folder / entry.name / "vectors", unit)
    _embed(cfg, ctx, plan, *models_and_batches(cfg, ctx.root, tars), len(tars))


def _embed(cfg, ctx: RunContext, plan: UnitPlan, models: dict, batches: Iterator[dict], shards: int) -> None:
    outputs: dict[str, _ShardOutput] = {}
    progress = tqdm(total=shards, desc=f"index[{cfg.name}]", unit="shard", disable=not ctx.is_main)
    try:
        with _Writer() as writer:
            for batch in batches:
                _take(cfg, ctx, plan, models, batch, outputs, writer, progress)
    finally:
        del batches  # the loader's workers stop here, even when a kept traceback holds this frame
    progress.close()


def _take(cfg, ctx, plan: UnitPlan, models: dict, batch: dict, outputs: dict, writer, progress) -> None:
    """One batch: its vectors from every model; a shard's end item hands the shard to the writer."""
    items = [item for item in batch["items"] if not item.get("end")]
    ok = [item for item in items if item["ok"]]
    for item in items:
        out = outputs.setdefault(item["unit"], _ShardOutput(list(models)))
        out.corrupt += not item["ok"]
        out.keys += [item["key"]] if item["ok"] else []
    if ok:
        unit = ok[0]["unit"]
        for name, clip in models.items():
            outputs[unit].vectors[name].append(clip.encode_images(batch["tensors"][0]).numpy())
    for item in batch["items"]:
        if item.get("end"):
            unit, info = item["unit"], item["info"]
            if isinstance(info, str):  # the worker could not read the tar: damaged
                raise ShardError(info)
            out = outputs.pop(unit, _ShardOutput(list(models)))
            args = (cfg, ctx, plan, unit, out, info)
            writer.submit(_write_shard, *args, done=lambda: progress.update(1))


class _Writer:
    """One background thread writing finished shards in order; `submit` first waits for (and
    re-raises the error of) the write before, so at most one shard is pending. Leaving the block
    waits for the last write; its error is raised unless another one is already on its way out."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="index-write")
        self.pending = None

    def submit(self, write, *args, done) -> None:
        self.wait()
        self.pending = self.pool.submit(lambda: (write(*args), done()))

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self.wait()
            elif self.pending is not None:  # a finished shard is still written; our error wins
                self.pending.exception()
        finally:
            self.pool.shutdown(wait=True)


def _write_shard(cfg, ctx, plan: UnitPlan, unit: str, out: _ShardOutput, members: dict[str, Member]) -> None:
    folder, files = plan.stage_dir, []
    for name, chunks in out.vectors.items():
        dim = chunks[0].shape[1] if chunks else 0
        array = np.concatenate(chunks).astype(np.float16) if chunks else np.zeros((0, dim), np.float16)
        path = vectors_path(folder, name, unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as handle:
            np.save(handle, np.ascontiguousarray(array))
        files.append(path)
    captions = _captions(cfg, ctx.root, unit, out.keys, members)
    rows = [
        {
            "key": key,
            "url": members[key].url,
            "alt": members[key].alt,
            "caption": captions[key][0] if captions[key] else None,
            "captions": captions[key],
            "shard": unit,
            "offset": members[key].offset,
            "size": members[key].size,
        }
        for key in out.keys
    ]
    meta = meta_path(folder, unit)
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=META_SCHEMA), meta)
    counts = {"images": len(out.keys), "corrupt_images": out.corrupt}
    plan.mark_done(unit, {"counts": counts}, outputs=[meta, *files])
