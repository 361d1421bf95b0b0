"""The inspect page: one static HTML file to look at what the pipeline made, no server or network needed.

Reads  `images/<shard>.tar` (jpg, txt alt text, cls label), `images/labels.json` (class names),
       `images/<shard>.parquet` (img2dataset's per-row status and error_message) and, with a caption
       set, `captions/<set>/<shard>.parquet` (captions, CLIP scores, and the optional `dropped` column:
       what the filter removed and why). Only shards whose marker exists are read.
Writes `DIR/index.html` (default `<root>/inspect/captions-<set>/` or `<root>/inspect/download/`):
       thumbnails embedded as data URLs, CSS and JS inline, the plots as inline SVG.
Run    python -m pipeline inspect MANIFEST --captions SET [--shards 000000,000003] [--samples 64] [--out DIR]
       python -m pipeline inspect MANIFEST [--download]     # the download alone: images, alt text, status

The summary at the top covers every row of the chosen shards; the cards show the first `samples` images.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from shards.atomic import write_text_atomic
from shards.captions import CaptionShardError, DroppedCaption, read_caption_shard, read_dropped
from shards.markers import DONE_DIR
from shards.naming import list_shards
from shards.reader import iter_samples
from stages.errors import ShardError, StageConfigError
from stages.layout import RunLayout, read_labels

log = logging.getLogger(__name__)

THUMB_PIXELS = 160


@dataclass
class Card:
    unit: str
    key: str
    thumb: str | None  # data URL, None when the bytes do not decode
    alt: str
    label: str | None
    captions: list[tuple[str, float | None]] = field(default_factory=list)
    dropped: tuple[DroppedCaption, ...] = ()


@dataclass
class Summary:
    images: int = 0
    captions_per_image: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    dropped_reasons: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # key, url, error

    @property
    def empty_images(self) -> int:
        return sum(1 for n in self.captions_per_image if n == 0)


def build_page(
    root: Path,
    caption_set: str | None = None,
    shards: list[str] | None = None,
    samples: int = 64,
    out: Path | None = None,
) -> Path:
    """Write the page for a caption set (or the download alone, `caption_set=None`); return its path."""
    layout = RunLayout(root)
    units = _units(layout, caption_set, shards)
    labels = read_labels(layout)
    summary, cards = Summary(), []
    for unit in units:
        _read_unit(layout, unit, caption_set, labels, summary, cards, max(samples - len(cards), 0))
    folder = Path(out) if out else layout.inspect(f"captions-{caption_set}" if caption_set else "download")
    path = folder / "index.html"
    title = f"caption set {caption_set!r}" if caption_set else "download"
    write_text_atomic(
        path, page_html(f"{title}: {', '.join(units)}", summary, cards, caption_set is not None)
    )
    log.info("inspect: %d of %d images of %d shards in %s", len(cards), summary.images, len(units), path)
    return path


def _units(layout: RunLayout, caption_set: str | None, shards: list[str] | None) -> list[str]:
    folder = layout.captions(caption_set) if caption_set else layout.images
    done = list_shards(folder / DONE_DIR, ".json")
    if not done:
        raise ShardError(f"inspect: no finished shards in {folder}; run the stage first")
    missing = sorted(set(shards or ()) - set(done))
    if missing:
        raise StageConfigError(f"inspect: shards not finished in {folder}: {', '.join(missing)}")
    return [u for u in done if u in set(shards)] if shards else done


def _read_unit(layout, unit, caption_set, labels, summary: Summary, cards: list[Card], room: int) -> None:
    """Add the unit's rows to `summary` and up to `room` of its images to `cards`."""
    _add_status(layout.images / f"{unit}.parquet", summary)
    tar_samples = list(iter_samples([layout.image_tar(unit)]))
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
            summary.dropped_reasons.update(d.reason for d in lost)
        if room > 0:
            cards.append(_card(unit, sample, row, lost, labels))
            room -= 1


def _add_status(parquet: Path, summary: Summary) -> None:
    """img2dataset's status column, and the failed rows with their error."""
    if not parquet.exists():
        return
    table = pq.read_table(parquet)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    statuses = columns.get("status", [])
    summary.statuses.update(statuses)
    for i, status in enumerate(statuses):
        if status != "success":
            summary.failures.append(
                (
                    str(columns.get("key", [""] * len(statuses))[i]),
                    str(columns.get("url", [""] * len(statuses))[i]),
                    str(columns.get("error_message", [""] * len(statuses))[i]),
                )
            )


def _card(unit: str, sample: dict, row, dropped, labels) -> Card:
    label = None
    if sample.get("cls") is not None:
        index = int(sample["cls"].decode().strip())
        label = str(labels[index]) if labels and 0 <= index < len(labels) else str(index)
    captions = []
    if row is not None:
        scores = row.scores or [None] * len(row.captions)
        captions = list(zip(row.captions, scores))
    alt = sample.get("txt", b"").decode("utf-8", "replace")
    return Card(unit, sample["__key__"], _thumbnail(sample.get("jpg")), alt, label, captions, dropped)


def _thumbnail(data: bytes | None) -> str | None:
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------- HTML


def page_html(title: str, summary: Summary, cards: list[Card], with_captions: bool) -> str:
    body = "\n".join(_card_html(card, with_captions) for card in cards)
    return PAGE.format(
        title=html.escape(title),
        summary=_summary_html(summary, with_captions),
        shown=len(cards),
        total=len(cards),
        sort_options=SORT_OPTIONS if with_captions else "",
        search_what="caption" if with_captions else "alt text",
        cards=body,
    )


def _summary_html(summary: Summary, with_captions: bool) -> str:
    facts = [f"<li><b>{summary.images}</b> images in the chosen shards</li>"]
    if summary.statuses:
        counts = ", ".join(f"{html.escape(str(k))} {v}" for k, v in sorted(summary.statuses.items()))
        facts.append(f"<li>img2dataset status: {counts}</li>")
    parts = []
    if with_captions:
        total = sum(summary.captions_per_image)
        facts.append(f"<li><b>{total}</b> captions; <b>{summary.empty_images}</b> images without any</li>")
        if summary.dropped_reasons:
            reasons = ", ".join(f"{html.escape(k)}: {v}" for k, v in summary.dropped_reasons.most_common())
            facts.append(f"<li>dropped by the filter: {reasons}</li>")
        per_image = Counter(summary.captions_per_image)
        bars = [(str(n), per_image.get(n, 0)) for n in range(max(per_image, default=0) + 1)]
        parts.append(svg_bars(bars, "captions per image", "plot-captions"))
        if summary.scores:
            parts.append(
                svg_bars(_histogram(summary.scores, 20), "CLIP score of kept captions", "plot-scores")
            )
    failures = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(u)}</td><td>{html.escape(e)}</td></tr>"
        for k, u, e in summary.failures[:100]
    )
    table = (
        f"<details><summary>{len(summary.failures)} rows not downloaded</summary>"
        f"<table class='failures'><tr><th>key</th><th>url</th><th>error</th></tr>{failures}</table></details>"
        if summary.failures
        else ""
    )
    return f"<ul class='facts'>{''.join(facts)}</ul><div class='plots'>{''.join(parts)}</div>{table}"


def _histogram(values: list[float], bins: int) -> list[tuple[str, int]]:
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - low) / width), bins - 1)] += 1
    return [(f"{low + i * width:.2f}", c) for i, c in enumerate(counts)]


def svg_bars(bars: list[tuple[str, int]], title: str, element_id: str) -> str:
    """A small bar chart as inline SVG: one bar per (label, count), the first and last label below."""
    width, height, pad = 320, 120, 18
    peak = max((c for _, c in bars), default=0) or 1
    step = (width - 2 * pad) / max(len(bars), 1)
    rects = []
    for i, (label, count) in enumerate(bars):
        h = (height - 2 * pad) * count / peak
        x, y = pad + i * step, height - pad - h
        rects.append(
            f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(step - 1, 1):.1f}' height='{h:.1f}'>"
            f"<title>{html.escape(label)}: {count}</title></rect>"
        )
    first, last = (bars[0][0], bars[-1][0]) if bars else ("", "")
    return (
        f"<figure id='{element_id}'><figcaption>{html.escape(title)}</figcaption>"
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>"
        f"{''.join(rects)}"
        f"<text x='{pad}' y='{height - 4}'>{html.escape(first)}</text>"
        f"<text x='{width - pad}' y='{height - 4}' text-anchor='end'>{html.escape(last)}</text>"
        f"<text x='{pad}' y='12'>max {peak}</text></svg></figure>"
    )


def _card_html(card: Card, with_captions: bool) -> str:
    best = max((s for _, s in card.captions if s is not None), default=None)
    searchable = " ".join(t for t, _ in card.captions) if with_captions else card.alt
    image = (
        f"<img src='{card.thumb}' alt='{html.escape(card.key)}'>"
        if card.thumb
        else "<div class='noimg'>undecodable</div>"
    )
    meta = (
        f"<div class='meta'><span class='key'>{html.escape(card.unit)}/{html.escape(card.key)}</span>"
        + (f" <span class='label'>{html.escape(card.label)}</span>" if card.label is not None else "")
        + f"</div><div class='alt'>alt: {html.escape(card.alt) or '<i>none</i>'}</div>"
    )
    captions = ""
    if with_captions:
        items = "".join(f"<li>{_scored(t, s)}</li>" for t, s in card.captions)
        captions = f"<ol class='captions'>{items}</ol>" + _dropped_html(card.dropped)
    return (
        f"<article class='card' data-score='{'' if best is None else f'{best:.6f}'}' "
        f"data-count='{len(card.captions)}' data-text='{html.escape(searchable.lower())}'>"
        f"{image}{meta}{captions}</article>"
    )


def _scored(text: str, score: float | None) -> str:
    shown = "" if score is None else f"<span class='score'>{score:.3f}</span> "
    return f"{shown}{html.escape(text)}"


def _dropped_html(dropped: tuple[DroppedCaption, ...]) -> str:
    if not dropped:
        return ""
    items = "".join(
        f"<li>{_scored(d.text, d.score)} <span class='reason'>{html.escape(d.reason)}</span></li>"
        for d in dropped
    )
    return f"<details class='dropped'><summary>{len(dropped)} dropped</summary><ul>{items}</ul></details>"


SORT_OPTIONS = (
    "<option value='score-desc'>best score, high to low</option>"
    "<option value='score-asc'>best score, low to high</option>"
    "<option value='count-asc'>fewest captions first</option>"
)

SCRIPT = """
const cards = Array.from(document.querySelectorAll('.card'));
const grid = document.getElementById('cards');
const count = document.getElementById('visible-count');
function score(card) { return card.dataset.score === '' ? -Infinity : parseFloat(card.dataset.score); }
function applySearch() {
  const words = document.getElementById('search').value.toLowerCase().trim().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const card of cards) {
    const hit = words.every(w => card.dataset.text.includes(w));
    card.hidden = !hit;
    shown += hit ? 1 : 0;
  }
  count.textContent = String(shown);
}
function applySort() {
  const how = document.getElementById('sort').value;
  const order = cards.slice();
  if (how === 'score-desc') order.sort((a, b) => score(b) - score(a));
  if (how === 'score-asc') order.sort((a, b) => score(a) - score(b));
  if (how === 'count-asc') order.sort((a, b) => a.dataset.count - b.dataset.count);
  for (const card of order) grid.appendChild(card);
}
document.getElementById('search').addEventListener('input', applySearch);
document.getElementById('sort').addEventListener('change', applySort);
"""

PAGE = (
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>inspect: {title}</title>
<link rel="icon" href="data:,">
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1em; color: #222; }}
.facts {{ margin: 0 0 .5em; }} .plots {{ display: flex; gap: 2em; flex-wrap: wrap; }}
figure {{ margin: 0; }} figcaption {{ font-weight: bold; }} svg rect {{ fill: #4a7ab7; }}
svg text {{ font-size: 10px; fill: #555; }}
.controls {{ position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ddd; }}
#search {{ width: 20em; }}
#cards {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }}
.card {{ border: 1px solid #ddd; border-radius: 4px; padding: .5em; }}
.card[hidden] {{ display: none; }}
.card img, .noimg {{ width: 160px; height: 160px; object-fit: contain; background: #eee; display: block; }}
.key {{ font-family: monospace; color: #666; }} .label {{ background: #eef; padding: 0 .3em; }}
.alt {{ color: #555; margin: .3em 0; }} .score {{ font-family: monospace; color: #2a6; }}
.captions, .dropped ul {{ padding-left: 1.4em; margin: .3em 0; }} .dropped {{ color: #888; }}
.reason {{ background: #fee; color: #a33; padding: 0 .3em; }}
.failures td {{ font-family: monospace; font-size: 12px; padding-right: 1em; }}
</style></head><body>
<h1>{title}</h1>
<section id="summary">{summary}</section>
<div class="controls">
<input id="search" type="search" placeholder="filter by {search_what}" aria-label="search">
<select id="sort" aria-label="order"><option value="shard">shard order</option>{sort_options}</select>
<span><span id="visible-count">{shown}</span> of {total} images shown</span>
</div>
<main id="cards">
{cards}
</main>
<script>"""
    + SCRIPT.replace("{", "{{").replace("}", "}}")
    + """</script>
</body></html>
"""
)


def parse_shards(text: str | None) -> list[str] | None:
    """`000000,000003` -> ["000000", "000003"] (the CLI's `--shards`)."""
    return [s.strip() for s in text.split(",") if s.strip()] if text else None
