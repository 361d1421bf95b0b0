"""The inspect page (stages/inspect.py) built by the CLI from real caption and image shards, rendered
in headless Debian chromium (tests/helpers/browser.py): no console errors, the cards and caption lists
read from the DOM, the search box typed into, a screenshot under the test's temp folder."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli
from shards.captions import SCHEMA, read_dropped
from tests.conftest import make_image_shards, write_caption_manifest
from tests.helpers.browser import MISSING, Chromium

needs_chromium = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
PHRASES = [f"a {c} {s} on {b}" for c in ("red", "blue", "green") for s in ("circle", "square") for b in "xy"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny_models) -> Path:
    """Two image shards of six, captioned by retrieval: 4 retrieved, the best 2 kept, 2 dropped."""
    folder = tmp_path_factory.mktemp("inspect")
    make_image_shards(folder / "run", shards=2, per_shard=6, corrupt=(4,))
    bank = folder / "bank.txt"
    bank.write_text("\n".join(PHRASES) + "\n")
    retrieval = {
        "bank": str(bank),
        "threshold": -1.0,
        "pretrained": str(tiny_models["clip_checkpoint"]),
        "config_dir": str(tiny_models["clip_configs"]),
    }
    caption = {
        "backend": "retrieval",
        "model": tiny_models["clip_arch"],
        "captions_per_image": 4,
        "retrieval": retrieval,
        "scoring": {"keep_top": 2},
    }
    manifest = write_caption_manifest(folder, caption)
    assert cli(["run", str(manifest), "--stage", "caption"]) == 0
    _img2dataset_status(folder / "run" / "images" / "000000.parquet", range(6), failed=("000000099",))
    return manifest


def _img2dataset_status(path: Path, rows, failed: tuple[str, ...]) -> None:
    """images/<shard>.parquet with img2dataset's columns: the shard's rows ok, `failed` not."""
    keys = [f"{n:09d}" for n in rows] + list(failed)
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "url": [f"http://127.0.0.1/{k}.jpg" for k in keys],
                "status": ["success"] * len(rows) + ["failed_to_download"] * len(failed),
                "error_message": [None] * len(rows) + ["HTTP Error 404: Not Found"] * len(failed),
            }
        ),
        path,
    )


def test_caption_shard_records_what_the_filter_dropped(captioned, tmp_path):
    shard = captioned.parent / "run" / "captions" / "retrieval" / "000000.parquet"
    table = pq.read_table(shard)
    assert table.schema.equals(SCHEMA)
    for row in table.to_pylist():
        if row["key"] == "000000004":  # not an image: nothing to caption, nothing dropped
            assert row["captions"] == [] and row["dropped"] == []
            continue
        assert (
            len(row["captions"]) == 2 and [d["reason"] for d in row["dropped"]] == ["beyond keep_top 2"] * 2
        )
        assert max(d["score"] for d in row["dropped"]) <= min(row["scores"])
    old = tmp_path / "old.parquet"  # a shard written before the column existed
    pq.write_table(table.drop(["dropped"]), old)
    assert read_dropped(old) == {key: () for key in table.column("key").to_pylist()}


@needs_chromium
def test_caption_page_in_a_browser(captioned, tmp_path, capsys):
    out = tmp_path / "page"
    args = ["inspect", str(captioned), "--captions", "retrieval", "--samples", "10", "--out", str(out)]
    assert cli(args) == 0
    page = out / "index.html"
    assert f"inspect page: {page}" in capsys.readouterr().out
    assert re.search(r"(src|href)=['\"]https?:", page.read_text()) is None  # self-contained
    rows = pq.read_table(captioned.parent / "run" / "captions" / "retrieval").to_pylist()
    word = rows[0]["captions"][0].split()[1]  # a colour
    expected = sum(any(word in c.split() for c in r["captions"]) for r in rows[:10])
    started = time.monotonic()
    with Chromium(tmp_path / "profile") as browser:
        browser.open(page.as_uri())
        assert browser.evaluate("document.querySelectorAll('.card').length") == 10
        assert browser.evaluate("document.querySelectorAll('.card ol.captions').length") == 10
        assert browser.evaluate("document.querySelectorAll('.card img').length") == 9  # one is not a picture
        assert browser.evaluate("document.querySelectorAll('.dropped').length") == 9
        assert browser.evaluate("document.querySelectorAll('#summary svg').length") == 2
        browser.type_into("#search", word)
        visible = "Array.from(document.querySelectorAll('.card')).filter(c => c.offsetParent !== null).length"
        assert 0 < expected < 10 and browser.evaluate(visible) == expected
        assert browser.evaluate("document.getElementById('visible-count').textContent") == str(expected)
        browser.evaluate(
            "const s = document.getElementById('sort'); s.value = 'score-asc';"
            "s.dispatchEvent(new Event('change'))"
        )
        scores = browser.evaluate("Array.from(document.querySelectorAll('.card')).map(c => c.dataset.score)")
        numbers = [float(s) for s in scores if s]
        assert numbers == sorted(numbers) and scores[0] == ""  # the empty image first
        shot = browser.screenshot(tmp_path / "inspect.png")
        assert browser.errors() == []
    assert shot.stat().st_size > 10_000
    print(f"browser part: {time.monotonic() - started:.1f} s")


@needs_chromium
def test_download_page_shows_alt_text_and_failures(captioned, tmp_path):
    out = tmp_path / "page"
    assert cli(["inspect", str(captioned), "--shards", "000000", "--out", str(out)]) == 0
    text = (out / "index.html").read_text()
    assert "failed_to_download 1" in text and "HTTP Error 404: Not Found" in text
    with Chromium(tmp_path / "profile") as browser:
        browser.open((out / "index.html").as_uri())
        assert browser.evaluate("document.querySelectorAll('.card').length") == 6
        browser.type_into("#search", "alt 3")
        assert browser.evaluate("document.getElementById('visible-count').textContent") == "1"
        browser.screenshot(tmp_path / "download.png")
        assert browser.errors() == []


def test_unknown_shard_is_a_clear_error(captioned, capsys):
    assert cli(["inspect", str(captioned), "--captions", "retrieval", "--shards", "000009"]) == 2
    assert "shards not finished" in capsys.readouterr().err
