"""The inspect page's HTML (stages/inspect.py reads the shards into `Summary` and `Card`s; this writes them).

One self-contained page: CSS and JS inline, thumbnails as data URLs, plots as inline SVG. Nothing read
from a shard is trusted here either: every text is escaped and cut to `MAX_TEXT_CHARS` (the caption
bank's line limit) with a note, a card lists at most `MAX_CAPTIONS_SHOWN` captions and as many
dropped ones, and the failures table its first `MAX_FAILURES_SHOWN` rows.

    page_html(title, summary, cards, with_captions, damaged={unit: [problem, ...]}, repair_hint="...")
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field

from shards.captions import DroppedCaption

MAX_TEXT_CHARS = 10_000
MAX_CAPTIONS_SHOWN = 100
MAX_FAILURES_SHOWN = 100
MAX_SEARCH_CHARS = 20_000  # of a card's texts, for the search box


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
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # key, url, error (the first few)
    failed_rows: int = 0  # all of them

    @property
    def empty_images(self) -> int:
        return sum(1 for n in self.captions_per_image if n == 0)


def bounded(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """`text` escaped for HTML, cut to `limit` characters with a note saying how long it was."""
    if len(text) <= limit:
        return html.escape(text)
    note = f"<span class='cut'>[cut: {len(text):,} characters in all, the first {limit:,} shown]</span>"
    return f"{html.escape(text[:limit])}… {note}"


def page_html(
    title: str,
    summary: Summary,
    cards: list[Card],
    with_captions: bool,
    damaged: dict[str, list[str]] | None = None,
    repair_hint: str = "",
) -> str:
    """The whole page; `damaged`: units left out because their files differ from their markers."""
    body = "\n".join(_card_html(card, with_captions) for card in cards)
    return PAGE.format(
        title=bounded(title, 500),
        damaged=_damaged_html(damaged or {}, repair_hint),
        summary=_summary_html(summary, with_captions),
        shown=len(cards),
        sampled=_sampled_text(len(cards), summary.images),
        sort_options=SORT_OPTIONS if with_captions else "",
        search_what="caption" if with_captions else "alt text",
        cards=body,
    )


def _sampled_text(cards: int, images: int) -> str:
    """What the counter's total means: the cards are the first `cards` of `images` images."""
    if cards == images:
        return f"of {cards} images shown (all of the chosen shards)"
    return f"of {cards} sampled images shown (the first {cards} of {images} in the chosen shards)"


def _damaged_html(damaged: dict[str, list[str]], repair_hint: str) -> str:
    if not damaged:
        return ""
    items = "".join(
        f"<li>damaged unit {bounded(unit, 100)}: {bounded(', '.join(problems), 2000)}</li>"
        for unit, problems in list(damaged.items())[:MAX_FAILURES_SHOWN]
    )
    more = (
        f"<li>... and {len(damaged) - MAX_FAILURES_SHOWN} more</li>"
        if len(damaged) > MAX_FAILURES_SHOWN
        else ""
    )
    return (
        f"<section id='damaged'><h2>{len(damaged)} damaged unit{'s' if len(damaged) != 1 else ''} left out"
        f"</h2><ul>{items}{more}</ul><p>{html.escape(repair_hint)} redoes them</p></section>"
    )


def _summary_html(summary: Summary, with_captions: bool) -> str:
    facts = [f"<li><b>{summary.images}</b> images in the chosen shards</li>"]
    if summary.statuses:
        counts = ", ".join(
            f"{bounded(str(k), 200)} {v}" for k, v in sorted(summary.statuses.items(), key=str)
        )
        facts.append(f"<li>img2dataset status: {counts}</li>")
    parts = []
    if with_captions:
        total = sum(summary.captions_per_image)
        facts.append(f"<li><b>{total}</b> captions; <b>{summary.empty_images}</b> images without any</li>")
        if summary.dropped_reasons:
            reasons = ", ".join(
                f"{bounded(str(k), 200)}: {v}"
                for k, v in summary.dropped_reasons.most_common(MAX_FAILURES_SHOWN)
            )
            facts.append(f"<li>dropped by the filter: {reasons}</li>")
        per_image = Counter(summary.captions_per_image)
        bars = [(str(n), per_image.get(n, 0)) for n in range(max(per_image, default=0) + 1)]
        parts.append(svg_bars(bars, "captions per image", "plot-captions"))
        if summary.scores:
            parts.append(
                svg_bars(_histogram(summary.scores, 20), "CLIP score of kept captions", "plot-scores")
            )
    failures = "".join(
        f"<tr><td>{bounded(k, 200)}</td><td>{bounded(u, 2000)}</td><td>{bounded(e, 2000)}</td></tr>"
        for k, u, e in summary.failures[:MAX_FAILURES_SHOWN]
    )
    shown = f" (the first {MAX_FAILURES_SHOWN})" if summary.failed_rows > MAX_FAILURES_SHOWN else ""
    table = (
        f"<details><summary>{summary.failed_rows} rows not downloaded{shown}</summary>"
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
    texts = [t for t, _ in card.captions[:MAX_CAPTIONS_SHOWN]] if with_captions else [card.alt]
    searchable = " ".join(t[:MAX_TEXT_CHARS] for t in texts)[:MAX_SEARCH_CHARS]
    image = (
        f"<img src='{card.thumb}' alt='{html.escape(card.key[:200])}'>"
        if card.thumb
        else "<div class='noimg'>undecodable</div>"
    )
    meta = (
        f"<div class='meta'><span class='key'>{bounded(card.unit, 100)}/{bounded(card.key, 200)}</span>"
        + (f" <span class='label'>{bounded(card.label, 200)}</span>" if card.label is not None else "")
        + f"</div><div class='alt'>alt: {bounded(card.alt) or '<i>none</i>'}</div>"
    )
    captions = ""
    if with_captions:
        items = "".join(f"<li>{_scored(t, s)}</li>" for t, s in card.captions[:MAX_CAPTIONS_SHOWN])
        captions = f"<ol class='captions'>{items}</ol>" + _more(len(card.captions), "captions")
        captions += _dropped_html(card.dropped)
    return (
        f"<article class='card' data-score='{'' if best is None else f'{best:.6f}'}' "
        f"data-count='{len(card.captions)}' data-text='{html.escape(searchable.lower())}'>"
        f"{image}{meta}{captions}</article>"
    )


def _more(count: int, what: str) -> str:
    if count <= MAX_CAPTIONS_SHOWN:
        return ""
    return f"<p class='cut'>[{count - MAX_CAPTIONS_SHOWN} more {what} not shown]</p>"


def _scored(text: str, score: float | None) -> str:
    shown = "" if score is None else f"<span class='score'>{score:.3f}</span> "
    return f"{shown}{bounded(text)}"


def _dropped_html(dropped: tuple[DroppedCaption, ...]) -> str:
    if not dropped:
        return ""
    items = "".join(
        f"<li>{_scored(d.text, d.score)} <span class='reason'>{bounded(d.reason, 200)}</span></li>"
        for d in dropped[:MAX_CAPTIONS_SHOWN]
    )
    return (
        f"<details class='dropped'><summary>{len(dropped)} dropped</summary><ul>{items}</ul>"
        f"{_more(len(dropped), 'dropped captions')}</details>"
    )


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
.cut {{ color: #a33; font-style: italic; }} #damaged {{ background: #fee; padding: .3em 1em; }}
</style></head><body>
<h1>{title}</h1>
{damaged}<section id="summary">{summary}</section>
<div class="controls">
<input id="search" type="search" placeholder="filter by {search_what}" aria-label="search">
<select id="sort" aria-label="order"><option value="shard">shard order</option>{sort_options}</select>
<span><span id="visible-count">{shown}</span> {sampled}</span>
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
