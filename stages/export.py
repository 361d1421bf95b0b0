"""Export image shards joined with one caption set as plain webdataset shards for other trainers.

Reads  `images/<shard>.tar` and `captions/<tag>/<shard>.parquet` (the caption stage must be complete).
Writes `DIR/<shard>.tar` with `<key>.jpg`, `<key>.txt` (the best caption: highest CLIP score, else
       the first), `<key>.json` (all captions, scores, alt text) and `<key>.cls`; then
       `DIR/sizes.json` (samples per shard, read by open_clip's trainer) last.
Run    `python -m pipeline export MANIFEST --captions TAG --to DIR`; open_clip then trains on it with
       `--dataset-type webdataset --train-data 'DIR/{000000..00000N}.tar'`.
Images without any caption are left out (a text-image trainer needs a text); the count is logged.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm import tqdm

from shards.atomic import write_json_atomic
from shards.naming import list_shards
from shards.reader import iter_samples
from shards.tables import read_parquet
from shards.tars import write_tar_atomic
from stages.base import StageConfigError

log = logging.getLogger(__name__)


def export_captions(root: Path, tag: str, target: Path) -> dict[str, int]:
    """Write the joined shards into `target`; return totals (samples written, images skipped)."""
    captions_dir = Path(root) / "captions" / tag
    if not (captions_dir / "_SUCCESS.json").exists():
        raise StageConfigError(f"export: caption set {tag!r} is not complete in {captions_dir}; run the caption stage")
    units = list_shards(captions_dir / "_done", ".json")
    sizes, skipped = {}, 0
    for unit in tqdm(units, desc=f"export[{tag}]", unit="shard"):
        samples, missing = _joined_samples(Path(root) / "images" / f"{unit}.tar", captions_dir / f"{unit}.parquet")
        info = write_tar_atomic(Path(target) / f"{unit}.tar", samples)
        sizes[f"{unit}.tar"] = info["samples"]
        skipped += missing
    write_json_atomic(Path(target) / "sizes.json", sizes)
    totals = {"shards": len(units), "samples": sum(sizes.values()), "images_without_captions": skipped}
    log.info("export[%s]: %d samples in %d shards to %s (%d images without captions left out)",
             tag, totals["samples"], totals["shards"], target, skipped)
    return totals


def _joined_samples(tar: Path, parquet: Path) -> tuple[list[tuple[str, dict[str, bytes]]], int]:
    table = read_parquet(parquet, columns=["key", "captions", "scores"]).to_pylist()
    by_key = {row["key"]: row for row in table}
    samples, missing = [], 0
    for sample in iter_samples([tar]):
        key = sample["__key__"]
        if key not in by_key:
            raise StageConfigError(f"export: key {key} of {tar} is missing from {parquet}")
        row = by_key[key]
        if not row["captions"]:
            missing += 1
            continue
        alt = sample.get("txt", b"").decode("utf-8", "replace")
        fields = {"jpg": sample["jpg"], "txt": row["captions"][0].encode(),
                  "json": json.dumps({"captions": row["captions"], "scores": row["scores"], "alt_text": alt}).encode()}
        if "cls" in sample:
            fields["cls"] = sample["cls"]
        samples.append((key, fields))
    return samples, missing
