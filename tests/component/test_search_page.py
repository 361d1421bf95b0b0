"""The search page of `serve` in headless chromium (tests/helpers/browser.py) over two real indexes
of the same tiny shards: type a caption and both result grids fill; click a result and its
image -> image results appear (itself first); upload a picture through the file input; hostile alt
text is shown as text, never run as HTML; no console errors."""

from __future__ import annotations

import json
import time

import pytest

from examples import tiny_models as tm
from examples.image_server import generated_jpeg
from pipeline.cli import main as cli
from pipeline.manifest import load_manifest
from stages.index.search import open_indexes
from stages.index.serve import make_app, running
from tests.helpers.browser import MISSING, Chromium
from tests.helpers.index_run import HOSTILE, write_index_manifest, write_shards

pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
HITS = "document.querySelectorAll('.pane[data-index={}] .hit').length"
KEYS = "Array.from(document.querySelectorAll('.pane[data-index={}] .hit')).map(h => h.dataset.key)"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("search-page")
    write_shards(folder / "run")
    _, other, _ = tm.save_tiny_clip(folder / "other", seed=1)
    models = [
        {"name": "baseline", "checkpoint": str(tiny_models["clip_checkpoint"])},
        {"name": "mcip", "checkpoint": str(other)},
    ]
    manifest = write_index_manifest(folder, tiny_models, models=models)
    assert cli(["run", str(manifest)]) == 0
    indexes = open_indexes(load_manifest(manifest), ["baseline", "mcip"])
    with running(make_app(indexes)) as url:
        yield url, folder


def _wait(browser, expression: str, ok=bool, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.evaluate(expression)
        if ok(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"{expression} stayed {value!r}")


def test_type_click_upload_and_hostile_text(served, tmp_path):
    url, folder = served
    with Chromium(tmp_path / "profile") as browser:
        browser.open(url + "/")
        assert _wait(browser, "document.querySelectorAll('.pane').length") == 2
        panes = browser.evaluate("Array.from(document.querySelectorAll('.pane h2')).map(h => h.textContent)")
        assert panes[0].startswith("baseline (11 images, exact)") and panes[1].startswith("mcip")

        browser.type_into("#q", "a red picture")
        for name in ("baseline", "mcip"):
            assert _wait(browser, HITS.format(name), lambda n: n == 20 or n == 11) == 11  # k 20 > 11 images

        second = browser.evaluate(KEYS.format("baseline"))[1]
        browser.evaluate(
            f"document.querySelector('.pane[data-index=baseline] .hit[data-key=\"{second}\"]').click()"
        )
        _wait(browser, "document.getElementById('query').dataset.kind", lambda kind: kind == "key")
        first = _wait(browser, KEYS.format("mcip") + "[0]", lambda key: key == second)
        assert first == second and browser.evaluate(KEYS.format("baseline") + "[0]") == second

        picture = tmp_path / "query.jpg"
        picture.write_bytes(generated_jpeg(7))
        document = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=document, selector="#upload")["nodeId"]
        browser.call("DOM.setFileInputFiles", files=[str(picture)], nodeId=node)
        _wait(browser, "document.getElementById('query').dataset.kind", lambda kind: kind == "image")
        assert _wait(browser, KEYS.format("baseline") + "[0]", lambda key: key == "000000007") == "000000007"

        browser.evaluate("document.getElementById('k').value = '10'")
        browser.type_into("#q", " number 1")  # the hostile alt text's picture is among the results
        _wait(browser, "document.getElementById('query').dataset.kind", lambda kind: kind == "text")
        captions = _wait(
            browser,
            "Array.from(document.querySelectorAll('.hit .caption')).map(c => c.textContent)",
            lambda texts: HOSTILE in texts,
        )
        assert HOSTILE in captions
        assert browser.evaluate("document.querySelectorAll('.hit b, .hit img[src=x]').length") == 0
        assert browser.evaluate("document.title") == "MCIP search"
        shot = browser.screenshot(tmp_path / "search.png")
        assert browser.errors() == [], json.dumps(browser.errors())
    assert shot.stat().st_size > 10_000
