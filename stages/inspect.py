"""The inspect page: one static HTML file to look at what the pipeline made, no server or network needed.

Reads  `images/<shard>.tar` (jpg, txt alt text, cls label), `images/labels.json` (class names),
       `images/<shard>.parquet` (img2dataset's per-row status and error_message) and, with a caption
       set, `captions/<set>/<shard>.parquet` (captions, CLIP scores, and the optional `dropped` column:
       what the filter removed and why). Only shards whose marker exists are read.
Writes `DIR/index.html` (default `<root>/inspect/captions-<set>/` or `<root>/inspect/download/`):
       thumbnails embedded as data URLs, CSS and JS inline, the plots as inline SVG
       (stages/inspect_html.py). DIR may be no other folder of the run root, nor one the manifest
       reads (stages/targets.py).
Run    python -m pipeline inspect MANIFEST --captions SET [--shards 000000,000003] [--samples 64] [--out DIR]
       python -m pipeline inspect MANIFEST [--download]     # the download alone: images, alt text, status

Every chosen unit is checked as the stages check it before its files are read: its marker against
the schema, its files against the marker (the full check: sizes, counts, keys, and the sha256 of
the bytes where the marker records one), for a caption page the image unit too. A damaged unit is
left out and named at the top of the page (and on stderr), as `status` names it; when every chosen
unit is damaged that is the error. The summary covers every row of the other units; the cards show
the first `samples` images, and the counter says how many of how many.
"""

from __future__ import annotations

import base64
import io
import logging
import tarfile
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from shards import markers, verify
from shards.atomic import write_text_atomic
from shards.captions import CaptionShardError, read_caption_shard, read_dropped
from shards.naming import list_shards
from shards.reader import iter_samples
from stages.base import DamagedOutput, repair_hint
from stages.errors import ShardError, StageConfigError
from stages.inspect_html import MAX_FAILURES_SHOWN, MAX_TEXT_CHARS, Card, Summary, page_html
from stages.layout import RunLayout, read_labels
from stages.targets import check_target, writing

log = logging.getLogger(__name__)

THUMB_PIXELS = 160
MAX_SAMPLES = 5000  # cards on one page: about 10 KiB each with the thumbnail
PAGE_FILE = "index.html"


def build_page(
    root: Path,
    caption_set: str | None = None,
    shards: list[str] | None = None,
    samples: int = 64,
    out: Path | None = None,
    inputs: Iterable[Path] = (),
    manifest: str = "MANIFEST",
) -> Path:
    """Write the page for a caption set (or the download alone, `caption_set=None`); return its path.
    `inputs`: the files and folders the manifest reads, which the page must not overwrite."""
    if not 0 < samples <= MAX_SAMPLES:
        raise StageConfigError(f"inspect: --samples must be between 1 and {MAX_SAMPLES}, got {samples}")
    layout = RunLayout(root)
    own = layout.root / "inspect"
    folder = Path(out) if out else layout.inspect(f"captions-{caption_set}" if caption_set else "download")
    check_target(folder, "inspect --out", root, lambda name: name == PAGE_FILE, inputs, allowed=own)
    units, damaged = _checked_units(layout, caption_set, shards)
    labels = read_labels(layout)
    summary, cards = Summary(), []
    for unit in units:
        _read_unit(layout, unit, caption_set, labels, summary, cards, max(samples - len(cards), 0))
    path = folder / PAGE_FILE
    title = f"caption set {caption_set!r}" if caption_set else "download"
    text = page_html(
        f"{title}: {', '.join(units)}",
        summary,
        cards,
        caption_set is not None,
        damaged,
        repair_hint(manifest),
    )
    with writing(path, "inspect"):
        write_text_atomic(path, text)
    if damaged:
        log.warning(
            "inspect: %d damaged unit(s) left out, named on the page: %s; %s redoes them",
            len(damaged),
            "; ".join(f"{u}: {', '.join(p)}" for u, p in list(damaged.items())[:3]),
            repair_hint(manifest),
        )
    log.info("inspect: %d of %d images of %d shards in %s", len(cards), summary.images, len(units), path)
    return path


def _checked_units(
    layout: RunLayout, caption_set: str | None, shards: list[str] | None
) -> tuple[list[str], dict[str, list[str]]]:
    """The chosen finished units whose files match their markers, and the damaged ones with what
    differs; `DamagedOutput` when none is left."""
    folder = layout.captions(caption_set) if caption_set else layout.images
    done = list_shards(folder / markers.DONE_DIR, ".json")
    if not done:
        raise ShardError(f"inspect: no finished shards in {folder}; run the stage first")
    missing = sorted(set(shards or ()) - set(done))
    if missing:
        shown = ", ".join(s[:40] for s in missing[:10])
        raise StageConfigError(f"inspect: shards not finished in {folder}: {shown}")
    chosen = [u for u in done if u in set(shards)] if shards else done
    damaged, stages = {}, set()
    for unit in chosen:
        captions = (
            _unit_problems(folder, unit, [layout.caption_shard(caption_set, unit)]) if caption_set else []
        )
        images = _unit_problems(layout.images, unit, [layout.image_tar(unit)])
        stages.update(name for name, found in (("caption", captions), ("download", images)) if found)
        if captions or images:
            damaged[unit] = captions + images
    if len(damaged) == len(chosen):  # nothing left to show: the error names what status would
        raise DamagedOutput("/".join(sorted(stages, reverse=True)), damaged)
    return [u for u in chosen if u not in damaged], damaged


def _unit_problems(folder: Path, unit: str, files: list[Path]) -> list[str]:
    """What is wrong with a unit's marker or its files (the full check); a marker written before
    markers recorded their files only needs `files` to exist."""
    try:
        marker = markers.read_marker(folder, unit)
    except markers.MarkerError as err:
        return [str(err)]
    if marker is None:
        return [f"{markers.marker_path(folder, unit)} is missing"]
    if markers.OUTPUTS in marker:
        return verify.check_outputs(folder, marker[markers.OUTPUTS], full=True)
    return [f"{path} is missing" for path in files if not path.is_file()]


def _read_unit(layout, unit, caption_set, labels, summary: Summary, cards: list[Card], room: int) -> None:
    """Add the unit's rows to `summary` and up to `room` of its images to `cards`."""
    _add_status(layout.images / f"{unit}.parquet", summary)
    tar = layout.image_tar(unit)
    try:
        tar_samples = list(iter_samples([tar]))
    except (OSError, tarfile.TarError, ValueError) as err:  # a marker without a record of its files
        raise ShardError(f"inspect: {tar}: unreadable image shard ({err})") from None
    keys = [s["__key__"] for s in tar_samples]
    rows, dropped = {}, {}
    if caption_set:
        shard = layout.caption_shard(caption_set, unit)
        try:
            rows, dropped = read_caption_shard(shard, keys), read_dropped(shard)
        except CaptionShardError as err:
            raise ShardError(f"inspect: {err}") from None
    summary.images += len(keys)
    for sample in tar_samples:
        row = rows.get(sample["__key__"])
        lost = dropped.get(sample["__key__"], ())
        if caption_set:
            summary.captions_per_image.append(len(row.captions))
            summary.scores.extend(row.scores or ())
            summary.dropped_reasons.update(d.reason[:MAX_TEXT_CHARS] for d in lost)
        if room > 0:
            cards.append(_card(unit, sample, row, lost, labels))
            room -= 1


def _add_status(parquet: Path, summary: Summary) -> None:
    """img2dataset's status column, and the failed rows with their error (the first few kept)."""
    if not parquet.exists():
        return
    try:
        table = pq.read_table(parquet, columns=None)
    except (OSError, pa.ArrowException) as err:
        raise ShardError(
            f"inspect: {parquet}: not a readable parquet table ({str(err).splitlines()[0]})"
        ) from None
    columns = {
        name: table.column(name).to_pylist()
        for name in ("key", "url", "status", "error_message")
        if name in table.column_names
    }
    statuses = [str(s) for s in columns.get("status", [])]
    summary.statuses.update(statuses)
    for i, status in enumerate(statuses):
        if status == "success":
            continue
        summary.failed_rows += 1
        if len(summary.failures) < MAX_FAILURES_SHOWN:
            summary.failures.append(
                tuple(
                    str(columns.get(name, [""] * len(statuses))[i])
                    for name in ("key", "url", "error_message")
                )
            )


def _card(unit: str, sample: dict, row, dropped, labels) -> Card:
    captions = []
    if row is not None:
        scores = row.scores or [None] * len(row.captions)
        captions = list(zip(row.captions, scores))
    alt = sample.get("txt", b"").decode("utf-8", "replace")
    label = _label(sample.get("cls"), labels)
    return Card(unit, sample["__key__"], _thumbnail(sample.get("jpg")), alt, label, captions, dropped)


def _label(raw: bytes | None, labels: list[str] | None) -> str | None:
    """The class name of a `.cls` index, the index when there is no name, the raw text when it is
    not an index."""
    if raw is None:
        return None
    text = raw[:200].decode("utf-8", "replace").strip()
    try:
        index = int(text)
    except ValueError:
        return text
    return str(labels[index]) if labels and 0 <= index < len(labels) else str(index)


def _thumbnail(data: bytes | None) -> str | None:
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (THUMB_PIXELS, THUMB_PIXELS))  # a JPEG decodes at the size it needs
            image = image.convert("RGB")
            image.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def parse_shards(text: str | None) -> list[str] | None:
    """`000000,000003` -> ["000000", "000003"] (the CLI's `--shards`)."""
    return [s.strip() for s in text.split(",") if s.strip()] if text else None
