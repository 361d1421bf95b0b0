"""Export image shards joined with one caption set as plain webdataset shards for other trainers.

Reads  `images/<shard>.tar` and `captions/<set>/<shard>.parquet` (the caption stage must be complete).
Writes `DIR/<shard>.tar` with `<key>.jpg`, `<key>.txt` (the best caption: highest CLIP score, else
       the first), `<key>.json` (all captions, scores, alt text) and `<key>.cls`; then
       `DIR/sizes.json` (samples per shard, read by open_clip's trainer) last.
Run    `python -m pipeline export MANIFEST --captions SET --to DIR`; open_clip then trains on it with
       `--dataset-type webdataset --train-data 'DIR/{000000..00000N}.tar'`.
Images without any caption are left out (a text-image trainer needs a text); the count is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from shards.atomic import write_json_atomic
from shards.captions import CaptionShardError, read_caption_shard
from shards.reader import iter_samples
from shards.tars import write_tar_atomic
from stages.errors import ShardError
from stages.layout import RunLayout

log = logging.getLogger(__name__)


def export_captions(root: Path, caption_set: str, target: Path) -> dict[str, int]:
    """Write the joined shards into `target`; return totals (samples written, images skipped)."""
    layout = RunLayout(root)
    units = layout.captioned(caption_set).verify().units
    layout.downloaded().verify(units)
    sizes, skipped = {}, 0
    for unit in tqdm(units, desc=f"export[{caption_set}]", unit="shard"):
        samples, missing = _joined_samples(layout.image_tar(unit), layout.caption_shard(caption_set, unit))
        info = write_tar_atomic(Path(target) / f"{unit}.tar", samples)
        sizes[f"{unit}.tar"] = info["samples"]
        skipped += missing
    write_json_atomic(Path(target) / "sizes.json", sizes)
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
