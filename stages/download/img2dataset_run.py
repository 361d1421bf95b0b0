"""The download stage's engine: img2dataset into a staging folder, then checked shards into `images/`.

img2dataset writes its tars in place, so a killed run can leave a truncated tar (img2dataset #164).
Here it writes under `images/_staging/rank-R/`; a watcher thread picks up each shard as soon as
img2dataset writes its `_stats.json` (after closing the tar), reads the tar back in full, checks its
sample count against the stats, rewrites it with stable keys (`.cls` added, samples sorted by key)
under a temporary name, renames it to `images/<shard>.tar` and only then writes the marker.
img2dataset runs with the guards of stages/download/guards.py (header size check before decoding,
16-bit pictures scaled to 8 bit, empty bodies named, a total deadline per URL).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from shards.naming import shard_name
from shards.tables import read_parquet, write_parquet_atomic
from shards.tars import TruncatedTarError, read_tar_samples, write_tar_atomic
from stages.base import RunContext, UnitPlan
from stages.download.inputs import ROW_COLUMN
from stages.errors import ShardError

POLL_S = 0.2
log = logging.getLogger(__name__)


class ShardCheckError(ShardError):
    """img2dataset's output for a shard failed our checks; the shard stays pending."""


def download_units(
    cfg, urls, jobs: list[tuple[str, list[int] | range]], plan: UnitPlan, out: Path, ctx: RunContext
) -> dict[str, Any]:
    """Download `jobs` ((unit, rows) pairs) of the URL input `urls` (stages/download/inputs.py) and
    mark each finished unit done; return run stats."""
    from stages.download import row_key

    staging = out / "_staging" / f"rank-{ctx.rank:05d}"
    progress = tqdm(total=len(jobs), unit="shard", desc="download", disable=not ctx.is_main)
    started, images_ok, failures = time.monotonic(), 0, []
    log.info("download: %d shard(s) to download on rank %d", len(jobs), ctx.rank)
    for call_index, group in enumerate(_aligned_groups(jobs, cfg.samples_per_shard)):
        folder = staging / f"call-{call_index:04d}"
        table = _group_table(urls, group)
        input_path = _write_input(table, folder)
        finalizer = _Finalizer(
            cfg, table, urls.num_rows, group, folder / "out", out, plan, row_key, progress, ctx.rank
        )
        finalizer.start()
        try:
            _call_img2dataset(cfg, input_path, folder / "out", "caption" in table.column_names)
        finally:
            finalizer.stop_and_sweep()
        images_ok += finalizer.images_ok
        failures += finalizer.failures
        shutil.rmtree(folder, ignore_errors=True)
    progress.close()
    shutil.rmtree(staging, ignore_errors=True)
    if failures:
        raise ShardCheckError(
            f"{len(failures)} shard(s) failed checks and stay pending: " + "; ".join(failures)
        )
    elapsed = time.monotonic() - started
    return {"images_ok": images_ok, "seconds": elapsed, "images_per_s": images_ok / max(elapsed, 1e-9)}


def _aligned_groups(jobs, per_shard: int):
    """Split jobs so that inside a group every unit but the last has exactly `per_shard` rows:
    then img2dataset's shard j of the group is exactly our unit j."""
    group = []
    for job in jobs:
        group.append(job)
        if len(job[1]) != per_shard:
            yield group
            group = []
    if group:
        yield group


def _group_table(urls, group) -> pa.Table:
    """The URL rows of a group of units, in unit order (each read from the files on its own)."""
    from stages.download import unit_table

    return pa.concat_tables([unit_table(urls, rows) for _, rows in group], promote_options="permissive")


def _write_input(table: pa.Table, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "input.parquet"
    write_parquet_atomic(table.drop_columns([c for c in ("cls",) if c in table.column_names]), path)
    return path


def _call_img2dataset(cfg, input_path: Path, output: Path, has_caption: bool) -> None:
    # albumentations (imported by img2dataset) otherwise asks PyPI for updates in every worker
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    from stages.download.guards import guarded_img2dataset

    with guarded_img2dataset(cfg.max_image_area, cfg.deadline_s):
        img2dataset.download(
            url_list=str(input_path),
            input_format="parquet",
            url_col="url",
            caption_col="caption" if has_caption else None,
            save_additional_columns=[ROW_COLUMN, *cfg.save_additional_columns],
            min_image_size=cfg.min_image_size,
            max_aspect_ratio=cfg.max_aspect_ratio or float("inf"),
            output_folder=str(output),
            output_format="webdataset",
            oom_shard_count=6,
            image_size=cfg.image_size,
            resize_mode=cfg.resize_mode,
            encode_quality=cfg.encode_quality,
            encode_format="jpg",
            number_sample_per_shard=cfg.samples_per_shard,
            processes_count=cfg.processes,
            thread_count=cfg.threads,
            timeout=cfg.timeout_s,
            retries=cfg.retries,
            extract_exif=False,
            compute_hash="sha256",
            enable_wandb=False,
            max_image_area=cfg.max_image_area or float("inf"),
            incremental_mode="incremental",
            distributor="multiprocessing",
        )


def _by_reason(status_dict: dict[str, int]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for message, n in status_dict.items():
        reason = failure_reason(message)
        reasons[reason] = reasons.get(reason, 0) + n
    return reasons


class _Finalizer(threading.Thread):
    """Watches a staging folder and moves each shard img2dataset finishes into place."""

    def __init__(
        self,
        cfg,
        table,
        table_rows,
        group,
        staging_out: Path,
        out: Path,
        plan: UnitPlan,
        row_key,
        progress,
        rank: int,
    ):
        super().__init__(daemon=True, name="download-finalizer")
        self.cfg, self.group, self.staging_out, self.table_rows = cfg, group, staging_out, table_rows
        self.cls_by_row = (
            dict(zip(table[ROW_COLUMN].to_pylist(), table["cls"].to_pylist()))
            if "cls" in table.column_names
            else None
        )
        self.out, self.plan, self.row_key, self.progress, self.rank = out, plan, row_key, progress, rank
        self.pending = set(range(len(group)))
        self.images_ok = 0
        self.failures: list[str] = []
        self._stop_event = threading.Event()
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self._sweep()
                self._stop_event.wait(POLL_S)
        except BaseException as err:  # surfaced by stop_and_sweep in the main thread
            self._error = err

    def stop_and_sweep(self) -> None:
        self._stop_event.set()
        self.join()
        if self._error is not None:
            raise self._error
        self._sweep(final=True)

    def _sweep(self, final: bool = False) -> None:
        for j in sorted(self.pending):
            path = self.staging_out / f"{shard_name(j)}_stats.json"
            if not path.exists():
                continue
            stats = _read_stats(path)
            if stats is None and not final:  # img2dataset is still writing it (not atomically)
                continue
            self.pending.discard(j)
            self._finalize(j, stats)

    def _finalize(self, j: int, stats: dict[str, Any] | None) -> None:
        unit, _ = self.group[j]
        try:
            payload = self._move_into_place(j, unit, stats)
        except (ShardCheckError, TruncatedTarError) as err:
            self.failures.append(str(err))
            return
        self.plan.mark_done(unit, payload, outputs=[self.out / f"{unit}.tar", self.out / f"{unit}.parquet"])
        self.images_ok += payload["counts"]["ok"]
        self.progress.update(1)

    def _move_into_place(self, j: int, unit: str, stats: dict[str, Any] | None) -> dict[str, Any]:
        name = shard_name(j)
        if stats is None:
            raise ShardCheckError(
                f"shard {unit}: img2dataset's {self.staging_out / name}_stats.json is not JSON"
            )
        samples = read_tar_samples(self.staging_out / f"{name}.tar")
        if sum(1 for s in samples.values() if "jpg" in s) != stats["successes"]:
            raise ShardCheckError(
                f"shard {unit}: tar holds {len(samples)} images, img2dataset reported {stats['successes']}"
            )
        counts = shard_counts(stats)
        kind = "retry" if int(unit) * self.cfg.samples_per_shard >= self.table_rows else "base"
        if kind == "base":  # a retry shard holds only rows that failed before
            _check_failed_fraction(unit, counts, self.cfg.max_failed_fraction)
        tar_info = write_tar_atomic(self.out / f"{unit}.tar", self._rekeyed(samples.values()))
        self._write_sidecar(name, unit)
        return {
            "kind": kind,
            "rank": self.rank,
            "counts": counts,
            "tar_bytes": tar_info["tar_bytes"],
            "tar_sha256": tar_info["tar_sha256"],
            "seconds": stats["duration"],
        }

    def _rekeyed(self, samples):
        rekeyed = []
        for fields in samples:
            meta = json.loads(fields["json"])
            row = int(meta.pop(ROW_COLUMN))
            meta["key"] = self.row_key(row)
            new = {"jpg": fields["jpg"], "json": json.dumps(meta, sort_keys=True).encode()}
            if "txt" in fields:
                new["txt"] = fields["txt"]
            if self.cls_by_row is not None:
                new["cls"] = str(self.cls_by_row[row]).encode()
            rekeyed.append((meta["key"], new))
        return sorted(rekeyed)

    def _write_sidecar(self, name: str, unit: str) -> None:
        status = read_parquet(self.staging_out / f"{name}.parquet")
        keys = pa.array([self.row_key(r) for r in status[ROW_COLUMN].to_pylist()], pa.string())
        status = status.set_column(status.column_names.index("key"), "key", keys)
        status = status.take(pc.sort_indices(status, [("key", "ascending")]))
        write_parquet_atomic(status.drop_columns([ROW_COLUMN]), self.out / f"{unit}.parquet")


FILTER_MESSAGES = ("image too small", "aspect ratio too large")  # img2dataset's, for its filters


def is_filtered(message: str) -> bool:
    """A row img2dataset left out on purpose (`min_image_size`, `max_aspect_ratio`), not a failure."""
    return message in FILTER_MESSAGES


def shard_counts(stats: dict[str, Any]) -> dict[str, Any]:
    """Rows, ok, failed and filtered (each failure and filter by reason) from img2dataset's stats."""
    not_ok = {reason: n for reason, n in stats["status_dict"].items() if reason != "success"}
    filtered = {reason: n for reason, n in not_ok.items() if is_filtered(reason)}
    failed = {reason: n for reason, n in not_ok.items() if not is_filtered(reason)}
    return {
        "rows": stats["count"],
        "ok": stats["successes"],
        "failed": sum(failed.values()),
        "failed_by_reason": _by_reason(failed),
        "filtered": sum(filtered.values()),
        "filtered_by_reason": _by_reason(filtered),
    }


def _check_failed_fraction(unit: str, counts: dict[str, Any], limit: float) -> None:
    """Most rows failing means a broken URL table or server, not a small dataset (img2dataset#451)."""
    if counts["rows"] and counts["failed"] / counts["rows"] > limit:
        reasons = sorted(counts["failed_by_reason"].items(), key=lambda kv: -kv[1])[:3]
        why = ", ".join(f"{reason}: {n}" for reason, n in reasons)
        raise ShardCheckError(
            f"shard {unit}: {counts['failed']} of {counts['rows']} rows failed ({why}), more than "
            f"max_failed_fraction {limit}; fix the URLs or raise max_failed_fraction"
        )


_REASONS = (  # (substring of the error message, reason shown in counts); first match wins
    ("empty response body", "empty response body"),  # these three from stages/download/guards.py
    ("deadline exceeded", "deadline exceeded"),
    ("image area too large", "image too large"),
    ("Image decoding error", "not a decodable image"),
    ("loadsave.cpp", "image too large"),
    ("unknown url type", "bad url"),
    ("no host given", "bad url"),
    ("timed out", "timeout"),
    ("Connection refused", "connection refused"),
    ("image too small", "image too small"),
)


def failure_reason(message: str, width: int = 60) -> str:
    """A short, countable reason for img2dataset's error message (the full text stays in the parquet)."""
    if message.startswith("HTTP Error "):
        return "http " + message.split()[2].rstrip(":")
    for needle, reason in _REASONS:
        if needle in message:
            return reason
    message = " ".join(message.split())
    return message if len(message) <= width else message[: width - 3] + "..."


def _read_stats(path: Path) -> dict[str, Any] | None:
    """img2dataset's stats of a finished shard, or None while the file is still being written."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
