"""Export image shards joined with one caption set as plain webdataset shards for other trainers.

Reads  `images/<shard>.tar` and `captions/<set>/<shard>.parquet` (the caption stage must be complete).
Writes `DIR/<shard>.tar` with `<key>.jpg`, `<key>.txt` (the best caption: highest CLIP score, else
       the first), `<key>.json` (all captions, scores, alt text) and `<key>.cls`; then
       `DIR/sizes.json` (samples per shard, read by open_clip's trainer) last.
Run    `python -m pipeline export MANIFEST --captions SET --to DIR`; open_clip then trains on it with
       `--dataset-type webdataset --train-data 'DIR/{000000..00000N}.tar'`.
Images without any caption are left out (a text-image trainer needs a text); the count is logged.
DIR may not be inside the run root or a folder the manifest reads, nor hold a file it reads under a
name export writes (stages/targets.py): an export never overwrites what the pipeline made or reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from shards.atomic import write_json_atomic
from shards.captions import CaptionShardError, read_caption_shard
from shards.reader import iter_samples
from shards.tars import write_tar_atomic
from stages.errors import ShardError
from stages.layout import RunLayout
from stages.targets import check_target, writing

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"


def is_export_file(name: str) -> bool:
    """The names an export writes into its folder: shard tars and sizes.json (and their temporaries)."""
    return name == SIZES_FILE or name.endswith(".tar") or name.endswith(".tmp")


def export_captions(
    root: Path, caption_set: str, target: Path, inputs: Iterable[Path] = ()
) -> dict[str, int]:
    """Write the joined shards into `target`; return totals (samples written, images skipped).
    `inputs`: the files and folders the manifest reads, which `target` must not overwrite."""
    layout = RunLayout(root)
    target = Path(target)
    check_target(target, "export --to", root, is_export_file, inputs)
    units = layout.captioned(caption_set).verify().units
    layout.downloaded().verify(units)
    sizes, skipped = {}, 0
    for unit in tqdm(units, desc=f"export[{caption_set}]", unit="shard"):
        samples, missing = _joined_samples(layout.image_tar(unit), layout.caption_shard(caption_set, unit))
        with writing(target / f"{unit}.tar", "export"):
            info = write_tar_atomic(target / f"{unit}.tar", samples)
        sizes[f"{unit}.tar"] = info["samples"]
        skipped += missing
    with writing(target / SIZES_FILE, "export"):
        write_json_atomic(target / SIZES_FILE, sizes)
    totals = {"shards": len(units), "samples": sum(sizes.values()), "images_without_captions": skipped}
    log.info(
        "export[%s]: %d samples in %d shards to %s (%d images without captions left out)",
        caption_set,
        totals["samples"],
        totals["shards"],
        target,
        skipped,
    )
    return totals


def _joined_samples(tar: Path, parquet: Path) -> tuple[list[tuple[str, dict[str, bytes]]], int]:
    tar_samples = list(iter_samples([tar]))
    try:
        rows = read_caption_shard(parquet, [sample["__key__"] for sample in tar_samples])
    except CaptionShardError as err:
        raise ShardError(f"export: {err}") from None
    samples, missing = [], 0
    for sample in tar_samples:
        key, row = sample["__key__"], rows[sample["__key__"]]
        if not row.captions:
            missing += 1
            continue
        alt = sample.get("txt", b"").decode("utf-8", "replace")
        about = {
            "captions": list(row.captions),
            "scores": list(row.scores) if row.scores is not None else None,
            "alt_text": alt,
        }
        fields = {"jpg": sample["jpg"], "txt": row.captions[0].encode(), "json": json.dumps(about).encode()}
        if "cls" in sample:
            fields["cls"] = sample["cls"]
        samples.append((key, fields))
    return samples, missing
