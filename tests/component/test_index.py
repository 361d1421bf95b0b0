"""The index stage on real tars with two tiny CLIP models, then `search` and the HTTP API of `serve`
(uvicorn on 127.0.0.1, queried with httpx): outputs and their markers, resume, exact search results
against a brute-force reference, the card, bounds and one-line 4xx errors, concurrent queries."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from examples import tiny_models as tm
from examples.image_server import bomb_png, generated_jpeg
from pipeline.cli import main as cli
from pipeline.manifest import load_manifest
from shards import markers
from stages.index.search import open_indexes
from stages.index.serve import make_app, running
from tests.conftest import snapshot
from tests.helpers.index_run import CORRUPT, HOSTILE, write_index_manifest, write_shards


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("index")
    keys = write_shards(folder / "run")
    _, other, _ = tm.save_tiny_clip(folder / "other", seed=1)
    models = [
        {"name": "base", "checkpoint": str(tiny_models["clip_checkpoint"])},
        {"name": "other", "checkpoint": str(other)},
    ]
    manifest = write_index_manifest(folder, tiny_models, models=models)
    assert cli(["run", str(manifest)]) == 0
    return manifest, keys


def _stage(manifest: Path) -> Path:
    return manifest.parent / "run" / "index" / "index"


def test_stage_writes_fp16_vectors_metadata_and_a_card_per_model(indexed):
    manifest, keys = indexed
    out = _stage(manifest)
    good = [k for k in keys if k != CORRUPT]
    meta = pq.read_table(out / "meta" / "000000.parquet").to_pylist()
    assert [r["key"] for r in meta] == [k for k in good if k < "000000006"]  # the corrupt one is not indexed
    assert meta[1]["alt"] == HOSTILE and meta[1]["caption"] == HOSTILE and meta[1]["url"].endswith("1.jpg")
    tar = (manifest.parent / "run" / "images" / "000000.tar").read_bytes()
    assert tar[meta[0]["offset"] : meta[0]["offset"] + meta[0]["size"]] == generated_jpeg(0)
    for model in ("base", "other"):
        vectors = np.load(out / model / "vectors" / "000000.npy")
        assert vectors.dtype == np.float16 and vectors.shape == (5, 32)
        assert np.allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1, atol=1e-3)
        card = json.loads((out / model / "index.json").read_text())
        assert (card["kind"], card["rows"], card["recall_at_k"], card["texts"]["rows"]) == (
            "exact",
            11,
            1.0,
            11,
        )
    base, other = (np.load(out / m / "vectors" / "000001.npy") for m in ("base", "other"))
    assert not np.allclose(base, other)  # each model embeds with its own weights
    done = markers.read_marker(out, "000000")
    assert done["counts"] == {"images": 5, "corrupt_images": 1} and "meta/000000.parquet" in done["outputs"]


def test_rerun_is_a_no_op_and_a_deleted_marker_redoes_that_shard(indexed):
    manifest, _ = indexed
    out = _stage(manifest)
    before = snapshot(out)
    assert cli(["run", str(manifest)]) == 0
    assert snapshot(out) == before
    markers.remove_marker(out, "000001")
    assert cli(["run", str(manifest)]) == 0
    after = snapshot(out)
    changed = {p for p in after if after[p] != before.get(p)}
    assert "meta/000001.parquet" in changed and "meta/000000.parquet" not in changed


def test_exact_search_equals_brute_force_and_the_cli_prints_it(indexed, capsys):
    manifest, keys = indexed
    index = open_indexes(load_manifest(manifest), ["base"])["base"]
    stored = np.concatenate(
        [
            np.load(_stage(manifest) / "base" / "vectors" / f"{s}.npy").astype(np.float64)
            for s in ("000000", "000001")
        ]
    )
    order = [k for k in keys if k != CORRUPT]
    query = stored[3] / np.linalg.norm(stored[3])
    expected = [order[i] for i in np.argsort(-(stored @ query), kind="stable")[:5]]
    hits = index.by_key(order[3], 5)
    assert [h.key for h in hits] == expected and abs(hits[0].score - 1) < 1e-3  # fp16 rows
    assert cli(["search", str(manifest), "--index", "base", "--key", order[3], "-k", "5", "--json"]) == 0
    assert [h["key"] for h in json.loads(capsys.readouterr().out)] == expected
    assert cli(["search", str(manifest), "--index", "base", "--text", "a red picture", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "1"
    assert cli(["search", str(manifest), "--index", "base", "--key", "../../etc/passwd"]) == 2
    assert cli(["search", str(manifest), "--index", "nope", "--key", order[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "a key is" in err[0] and "models: base, other" in err[1]


@pytest.fixture(scope="module")
def server(indexed):
    manifest, keys = indexed
    indexes = open_indexes(load_manifest(manifest), ["base", "other"])
    with running(make_app(indexes, max_k=20, max_upload_bytes=200_000, max_pixels=1e6)) as url:
        yield url, [k for k in keys if k != CORRUPT]


def test_api_answers_text_key_and_upload_queries_from_both_indexes(server):
    url, keys = server
    with httpx.Client(base_url=url, timeout=60) as client:
        listed = client.get("/api/indexes").json()["indexes"]
        assert [i["name"] for i in listed] == ["base", "other"] and listed[0]["rows"] == 11
        by_text = client.get("/api/search", params={"text": "a blue picture", "k": 4}).json()
        assert {n: len(r) for n, r in by_text["results"].items()} == {"base": 4, "other": 4}
        by_key = client.get("/api/search", params={"key": keys[2], "k": 3}).json()["results"]
        assert by_key["base"][0]["key"] == keys[2] and by_key["other"][0]["key"] == keys[2]
        upload = client.post("/api/search/image", params={"k": 3}, content=generated_jpeg(2)).json()[
            "results"
        ]
        assert upload["base"][0]["key"] == keys[2]  # the same picture re-encoded finds itself first
        texts = client.get("/api/texts", params={"key": keys[2], "k": 3}).json()["results"]["base"]
        assert len(texts) == 3 and texts[0]["score"] >= texts[1]["score"] >= texts[2]["score"]
        assert all(t["text"].startswith(("a ", "<img")) for t in texts)  # the alt texts, as the caption set
        picture = client.get(f"/api/picture/{keys[2]}")
        assert picture.headers["content-type"] == "image/jpeg" and picture.content == generated_jpeg(2)
        assert "script-src 'self'" in client.get("/").headers["content-security-policy"]


@pytest.mark.parametrize(
    "method,path,kwargs,status,reason",
    [
        ("get", "/api/search", {"params": {"text": "x", "k": 0}}, 400, "k must be between 1 and 20"),
        ("get", "/api/search", {"params": {"text": "x", "k": 21}}, 400, "k must be between 1 and 20"),
        ("get", "/api/search", {"params": {"text": "x", "k": "many"}}, 422, "k:"),
        ("get", "/api/search", {"params": {"k": 3}}, 400, "exactly one of text= or key="),
        ("get", "/api/search", {"params": {"text": " "}}, 400, "empty text query"),
        ("get", "/api/search", {"params": {"text": "x" * 1001}}, 400, "longer than 1000"),
        ("get", "/api/search", {"params": {"key": "999999999"}}, 404, "no picture with key"),
        ("get", "/api/picture/..%2F..%2Fetc%2Fpasswd", {}, 404, "Not Found"),  # no route takes a path
        ("get", "/api/picture/..", {}, 404, "Not Found"),
        ("get", "/api/picture/a%20b%3Cc", {}, 400, "a key is"),
        ("get", "/api/picture/000000004", {}, 404, "no picture with key"),  # the corrupt one
        ("post", "/api/search/image", {"content": b""}, 400, "empty upload"),
        ("post", "/api/search/image", {"content": b"x" * 200_001}, 413, "larger than 200000 bytes"),
        ("post", "/api/search/image", {"content": b"GIF89a-but-not-really"}, 400, "not a picture"),
        ("post", "/api/search/image", {"content": bomb_png(2000)}, 400, "image area too large: 2000 x 2000"),
    ],
)
def test_bad_requests_are_4xx_with_one_line(server, method, path, kwargs, status, reason):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as client:
        answer = getattr(client, method)(path, **kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert reason in error and "\n" not in error and "Traceback" not in error


def test_concurrent_queries_give_the_answers_of_sequential_ones(server):
    url, keys = server
    queries = [{"key": k, "k": 5} for k in keys] + [
        {"text": f"a picture number {n}", "k": 5} for n in range(11)
    ]
    with httpx.Client(base_url=url, timeout=120) as client:
        sequential = [client.get("/api/search", params=q).json()["results"] for q in queries]
        with ThreadPoolExecutor(8) as pool:
            parallel = list(
                pool.map(lambda q: client.get("/api/search", params=q).json()["results"], queries * 2)
            )
    assert parallel == sequential * 2


def test_upload_larger_than_its_pixels_allow_after_decode_is_refused_by_header(server):
    url, _ = server
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000), (1, 2, 3)).save(big, "JPEG", quality=10)
    with httpx.Client(base_url=url, timeout=60) as client:
        answer = client.post("/api/search/image", content=big.getvalue())
    assert answer.status_code == 400 and "1200 x 1000" in answer.json()["error"]


def test_an_hnsw_index_of_the_same_shards_finds_what_the_exact_one_finds(indexed, tiny_models):
    manifest, keys = indexed
    data = yaml.safe_load(manifest.read_text())
    data["stages"]["index"].update(
        {"name": "hnsw", "kind": "hnsw", "texts": False, "models": data["stages"]["index"]["models"][:1]}
    )
    other = manifest.with_name("hnsw.yaml")
    other.write_text(yaml.safe_dump(data))
    assert cli(["run", str(other)]) == 0
    card = json.loads((manifest.parent / "run" / "index" / "hnsw" / "base" / "index.json").read_text())
    assert card["kind"] == "hnsw" and card["recall_at_k"] == 1.0
    assert card["recall_curve"][0]["efSearch"] == 108  # the candidates searched: 10 k + 8
    assert (manifest.parent / "run" / "index" / "hnsw" / "base" / "hnsw.faiss").is_file()
    approximate = open_indexes(load_manifest(other), ["base"])["base"]
    exact = open_indexes(load_manifest(manifest), ["base"])["base"]
    for key in (k for k in keys if k != CORRUPT):
        assert [h.key for h in approximate.by_key(key, 5)] == [h.key for h in exact.by_key(key, 5)]


def test_serve_command_binds_localhost_and_answers(indexed):
    """`python -m pipeline serve` as a user starts it (port 0: a free one), then Ctrl-C."""
    import signal
    import subprocess
    import sys

    from tests.conftest import cli_env

    manifest, keys = indexed
    command = [sys.executable, "-m", "pipeline", "serve", str(manifest), "--index", "base", "--port", "0"]
    server = subprocess.Popen(command, cwd=manifest.parent, env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving base on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split("/ ")[0]
        answer = httpx.get(f"{url}/api/search", params={"key": keys[0], "k": 2}, timeout=60).json()
        assert answer["results"]["base"][0]["key"] == keys[0]
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
