"""Download stage: a URL table -> webdataset tar shards under `<root>/images/`, with img2dataset.

Reads  the URL table named by `stages.download.url_list`: a file, a folder or a glob of parquet, csv,
       tsv or jsonl files with one global row numbering (files in sorted name order; see
       stages/download/inputs.py for the record of their identity kept in `images/_input/`).
Writes `images/<shard>.tar` (`<key>.jpg`, `.txt`, `.json` with the additional columns, `.cls`),
       `images/<shard>.parquet` (per-row status), `images/_done/<shard>.json` (marker, last),
       `images/labels.json`, `images/_index.json` (wids shard index) and `images/_SUCCESS.json` when
       all shards are done.
Run    `python -m stages.download MANIFEST` (same as `python -m pipeline run MANIFEST --stage download`);
       add `--retry-failed` to re-download only the rows that failed, into extra shards.

Shard `i` holds rows `[i * samples_per_shard, (i + 1) * samples_per_shard)` of the table, and a
sample's key is its row number (`000000042`), so keys never depend on which run made a shard. A rank
reads only its own shards' rows (parquet row groups; text formats are split into per-shard files once).
Rows img2dataset filters out (`min_image_size`, `max_aspect_ratio`) are counted as `filtered` by
reason, not as failures.
img2dataset writes into a private staging folder; a shard reaches `images/` only once its tar
reads back complete and matches img2dataset's own count (see stages/download/img2dataset_run.py).
Hostile responses (decompression bombs, trickling servers, empty bodies, 16-bit pictures) are handled
by the guards of stages/download/guards.py.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from shards import marker_view, markers
from shards.atomic import remove_orphans, write_json_atomic
from shards.index import write_shard_index
from shards.naming import list_shards, shard_name, shard_names
from shards.tables import TableError, check_columns, infer_format, read_parquet
from shards.url_files import is_glob, resolve_url_files
from stages.base import (
    ManifestPath,
    RunContext,
    StageConfig,
    StageResult,
    add_counts,
    finish_stage,
    plan_units,
)
from stages.download.input_split import ensure_split
from stages.download.inputs import UrlInput, open_input, wanted_columns
from stages.errors import StageConfigError
from stages.layout import RunLayout

log = logging.getLogger(__name__)
INDEX_FILE = "_index.json"  # the wids shard index of every shard

NAME = "download"
FORMAT_VERSION = 1  # bump only when the meaning of the output changes
RETRY_DIR = "_retries"


class DownloadConfig(StageConfig):
    """`stages.download` in the manifest."""

    NOT_IN_FINGERPRINT: ClassVar[frozenset[str]] = frozenset(
        {"url_list", "processes", "threads", "timeout_s", "deadline_s", "retries", "max_failed_fraction"}
    )

    url_list: ManifestPath  # a file, a folder or a glob of files of one format
    input_format: Literal["parquet", "csv", "tsv", "jsonl"] | None = None
    url_col: str = "url"
    caption_col: str | None = None
    label_col: str | None = None
    image_size: PositiveInt = 256
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    encode_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: PositiveInt = 1000
    # columns of the URL table kept with each sample (its .json and the status parquet), as in img2dataset
    save_additional_columns: list[str] = []
    # img2dataset's filters: the shorter side at least this many pixels; longer / shorter side at most
    min_image_size: int = Field(0, ge=0)
    max_aspect_ratio: float | None = Field(None, gt=0)
    # refused from the header, before any pixel is decoded (stages/download/guards.py); None: no limit
    max_image_area: float | None = Field(1.0e8, gt=0)
    # a shard with more failed rows than this is not accepted: the stage stops with the top reasons
    max_failed_fraction: float = Field(0.5, ge=0, le=1)
    processes: PositiveInt = 4
    threads: PositiveInt = 32
    timeout_s: PositiveInt = 10  # each socket operation
    deadline_s: float = Field(30.0, gt=0)  # the whole download of one URL, retries included
    retries: int = Field(0, ge=0)

    @field_validator("url_list")
    @classmethod
    def _url_list_exists(cls, path: Path) -> Path:
        if not (path.is_file() or path.is_dir() or is_glob(path)):
            raise ValueError(f"URL table not found: {path}")
        return path

    @model_validator(mode="after")
    def _additional_columns_are_free(self) -> DownloadConfig:
        taken = {self.url_col, self.caption_col, self.label_col, *RESERVED_COLUMNS}
        for name in self.save_additional_columns:
            if name in taken:
                raise ValueError(
                    f"save_additional_columns: {name!r} is already a column of the output "
                    f"(taken: url/caption/label columns and {', '.join(sorted(RESERVED_COLUMNS))})"
                )
        if len(set(self.save_additional_columns)) != len(self.save_additional_columns):
            raise ValueError("save_additional_columns: a column is named twice")
        return self

    @property
    def table_format(self) -> str:
        """The format of the files (`input_format`, else the first file's suffix)."""
        if self.input_format:
            return self.input_format
        try:
            return infer_format(resolve_url_files(self.url_list)[1][0])
        except TableError as err:
            raise StageConfigError(str(err)) from None


# what img2dataset (or this stage) writes itself into a sample's .json and the status parquet
RESERVED_COLUMNS = frozenset(
    {
        "key",
        "url",
        "caption",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "exif",
        "sha256",
        "cls",
        "mcip_row",
    }
)


def stage_dir(root: Path) -> Path:
    return RunLayout(root).images


def row_key(row: int) -> str:
    """The sample key of URL-table row `row`: stable across runs, retries and shard layouts."""
    return f"{row:09d}"


def load_url_table(cfg: DownloadConfig, root: Path, force: bool = False) -> UrlInput:
    """The URL files with their record (row counts, labels, identity); errors name the file."""
    return open_input(cfg, root, force)


def unit_rows(unit: str, table_rows: int, cfg: DownloadConfig, root: Path) -> list[int] | range:
    """Row numbers of a unit: a contiguous range for base shards, a saved list for retry shards."""
    index = int(unit)
    base_count = math.ceil(table_rows / cfg.samples_per_shard)
    if index < base_count:
        start = index * cfg.samples_per_shard
        return range(start, min(start + cfg.samples_per_shard, table_rows))
    return json.loads((stage_dir(root) / RETRY_DIR / f"{unit}.json").read_text())["rows"]


def unit_table(urls: UrlInput, rows: list[int] | range):
    """The URL rows of one unit, read from the files (only those rows)."""
    if isinstance(rows, range):
        return urls.read_range(rows.start, rows.stop)
    return urls.read_rows(list(rows))


def list_units(table_rows: int, cfg: DownloadConfig, root: Path) -> list[str]:
    base = shard_names(math.ceil(table_rows / cfg.samples_per_shard))
    retries = list_shards(stage_dir(root) / RETRY_DIR, ".json")
    return base + [u for u in retries if int(u) >= len(base)]


def settings_of(cfg: DownloadConfig, urls: UrlInput) -> dict[str, Any]:
    return {**cfg.fingerprint_settings(), "url_list_sha256": urls.sha256, "format_version": FORMAT_VERSION}


def describe(cfg: DownloadConfig, root: Path, seed: int = 0) -> tuple[Path, list[str], dict[str, Any]]:
    """(stage folder, all units, fingerprinted settings): what `plan` and `status` need."""
    urls = load_url_table(cfg, root)
    return stage_dir(root), list_units(urls.num_rows, cfg, root), settings_of(cfg, urls)


def check_inputs(cfg: DownloadConfig) -> None:
    """Raise StageConfigError if a URL file does not open or lacks a column; reads only the files'
    headers (their rows are read once, when the run records them)."""
    try:
        _, paths = resolve_url_files(cfg.url_list, cfg.input_format)
        for path in paths:
            check_columns(path, cfg.table_format, wanted_columns(cfg))
    except TableError as err:
        raise StageConfigError(str(err)) from err


def deep_check_inputs(cfg: DownloadConfig) -> None:
    """What `validate` adds: every row of the text columns parses as UTF-8 text (as `run` needs),
    read in batches; parquet string columns are UTF-8 by their type and are not read."""
    from stages.download.inputs import deep_check

    deep_check(cfg)


def run(cfg: DownloadConfig, ctx: RunContext, retry_failed: bool = False) -> StageResult:
    """Download this rank's pending shards; with `retry_failed`, first plan retry shards."""
    from stages.download import img2dataset_run

    urls = load_url_table(cfg, ctx.root, ctx.force)
    out = stage_dir(ctx.root)
    settings = settings_of(cfg, urls)
    plan = plan_units(NAME, out, list_units(urls.num_rows, cfg, ctx.root), settings, ctx)
    if retry_failed:
        if _plan_retry_round(cfg, ctx, plan.units, urls.num_rows, bool(plan.pending)):
            plan = plan_units(NAME, out, list_units(urls.num_rows, cfg, ctx.root), settings, ctx)
    _remove_leftovers(out, plan.mine, ctx)
    if urls.labels is not None and ctx.is_main:
        write_json_atomic(RunLayout(ctx.root).labels_file, {"column": cfg.label_col, "labels": urls.labels})
    jobs = [(unit, unit_rows(unit, urls.num_rows, cfg, ctx.root)) for unit in plan.mine]
    if jobs:
        ensure_split(urls)
    stats = img2dataset_run.download_units(cfg, urls, jobs, plan, out, ctx) if jobs else None
    result = finish_stage(NAME, plan, len(jobs), merge_counts)
    if result.is_complete and plan.holds_every_marker and _index_stale(out, plan):  # checked them all
        _write_index(out, plan.units, plan.done)
    _log_summary(result, stats)
    return result


def _remove_leftovers(out: Path, mine: list[str], ctx: RunContext) -> None:
    """Temporary files of this rank's units and its staging folder, left by a crash."""
    for unit in mine:  # only this rank's units: other ranks may be writing theirs right now
        remove_orphans(out, unit)
        remove_orphans(out / markers.DONE_DIR, unit)
    shutil.rmtree(_staging_root(out) / f"rank-{ctx.rank:05d}", ignore_errors=True)
    if ctx.is_main and _staging_root(out).is_dir():
        for folder in _staging_root(out).iterdir():  # ranks of an earlier, wider run
            if folder.name.startswith("rank-") and int(folder.name[5:]) >= ctx.world_size:
                shutil.rmtree(folder, ignore_errors=True)


def _staging_root(out: Path) -> Path:
    return out / "_staging"


def _plan_retry_round(
    cfg: DownloadConfig, ctx: RunContext, units: list[str], table_rows: int, has_pending: bool
) -> bool:
    """Write retry-shard plans for rows that failed everywhere; True if new shards were planned."""
    if has_pending:
        log.info("retry-failed: finishing the pending shards first (they include earlier retries)")
        return False
    if not ctx.is_main:
        raise StageConfigError("--retry-failed plans new shards on rank 0 only; run it with one task")
    out = stage_dir(ctx.root)
    failed = _rows_still_failing(out, units)
    if not failed:
        log.info("retry-failed: no failed rows to retry")
        return False
    first = max(int(u) for u in units) + 1 if units else 0
    size = cfg.samples_per_shard
    for n, start in enumerate(range(0, len(failed), size)):
        write_json_atomic(
            out / RETRY_DIR / f"{shard_name(first + n)}.json", {"rows": failed[start : start + size]}
        )
    log.info("retry-failed: %d failed rows into %d new shard(s)", len(failed), math.ceil(len(failed) / size))
    return True


def _rows_still_failing(out: Path, units: list[str]) -> list[int]:
    """Rows that failed in every shard that holds them; rows img2dataset filtered out are not retried."""
    from stages.download.img2dataset_run import is_filtered

    failed: set[int] = set()
    succeeded: set[int] = set()
    for unit in units:
        table = read_parquet(out / f"{unit}.parquet", columns=["key", "status", "error_message"]).to_pydict()
        for key, status, message in zip(table["key"], table["status"], table["error_message"]):
            if status == "success":
                succeeded.add(int(key))
            elif not is_filtered(message or ""):
                failed.add(int(key))
    return sorted(failed - succeeded)


def merge_counts(done_markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over shards; a retry shard's successes recover rows counted failed in base shards."""
    counts: dict[str, Any] = {}
    retried: dict[str, Any] = {}
    for marker in done_markers:  # one pass: the markers may be handed over one at a time
        add_counts(retried if marker.get("kind") == "retry" else counts, marker.get("counts", {}))
    recovered = retried.get("ok", 0)
    counts["ok"] = counts.get("ok", 0) + recovered
    counts["failed"] = counts.get("failed", 0) - recovered
    counts["recovered_by_retry"] = recovered
    return counts


def _index_stale(out: Path, plan) -> bool:
    """`_index.json` is missing or older than a marker: a nothing-to-do run on 400,000 shards
    skips rebuilding it, a run that redid a shard (even one stopped before the index) does not."""
    try:
        written = (out / INDEX_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        return True
    return written < marker_view.newest_marker_ns(out, plan.done)


def _write_index(out: Path, units: list[str], done: dict[str, dict[str, Any]]) -> None:
    entries = [
        {
            "url": f"{u}.tar",
            "nsamples": done[u]["counts"]["ok"],
            "filesize": done[u]["tar_bytes"],
            "sha256": done[u]["tar_sha256"],
        }
        for u in units
        if u in done
    ]
    write_shard_index(out / INDEX_FILE, entries)


def _log_summary(result: StageResult, stats: dict[str, Any] | None) -> None:
    counts = result.counts
    reasons = Counter(counts.get("failed_by_reason", {}))
    why = ", ".join(f"{r}: {n}" for r, n in reasons.most_common(5))
    rate = f", {stats['images_per_s']:.1f} images/s this run" if stats else ""
    log.info(
        "download: %d/%d shards done (%d run now); %d ok, %d failed%s%s",
        result.units_done,
        result.units_total,
        result.units_run,
        counts.get("ok", 0),
        counts.get("failed", 0),
        f" [{why}]" if why else "",
        rate,
    )
