"""The streaming `server` client (captioning/server.py, stages/caption/streaming.py) against the
engine simulator, a real HTTP server on 127.0.0.1 (tests/helpers/engine_simulator.py): the window is
kept full across batches and shards, a straggler holds back only its own shard, two endpoints share
the work, sampled captions do not depend on batch or window, `--retry-failed` sends only the failed
images again, and a kill -9 mid-window then a rerun equals an uninterrupted run.

    .venv/bin/python -m pytest tests/component/test_caption_stream.py -q
"""

from __future__ import annotations

import json
import re
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captioning.server import ServerCaptioner
from pipeline.cli import main as cli
from tests.conftest import cli_env, make_image_shards, write_caption_manifest
from tests.helpers.engine_simulator import EngineSimulator, digest_of
from tests.helpers.kill_resume import CliRun, content_differences, tree_content

GREEDY = {"decoding": "prompts", "prompts": ["Describe it.", "What is it?"], "max_new_tokens": 8}
SAMPLE = {"decoding": "sample", "max_new_tokens": 8, "min_new_tokens": 0}
NO_FILTER = {"filter": {"min_words": 0, "dedupe": False}}


def _manifest(tmp_path: Path, root: str, server: dict, generation=GREEDY, **extra) -> Path:
    caption = {"backend": "server", "model": "sim", "server": server, "generation": generation, **NO_FILTER}
    return write_caption_manifest(tmp_path, {**caption, **extra}, root, f"{root}.yaml")


def _run(manifest: Path, *extra: str) -> int:
    return cli(["run", str(manifest), "--stage", "caption", *extra])


def _rows(root: Path) -> dict[str, dict]:
    rows = {}
    for path in sorted((root / "captions" / "server").glob("*.parquet")):
        rows.update({r["key"]: r for r in pq.read_table(path).to_pylist()})
    return rows


def _captions(root: Path) -> dict[str, list[str]]:
    return {key: row["captions"] for key, row in _rows(root).items()}


def _digests(root: Path, unit: str) -> dict[str, str]:
    """key -> sha256 of its picture, as the simulator logs it."""
    with tarfile.open(root / "images" / f"{unit}.tar") as tar:
        return {
            m.name.split(".")[0]: digest_of(tar.extractfile(m).read())
            for m in tar.getmembers()
            if m.name.endswith(".jpg")
        }


def _marker(root: Path, unit: str) -> dict:
    return json.loads((root / "captions" / "server" / "_done" / f"{unit}.json").read_text())


def test_streamed_greedy_captions_equal_the_batch_clients(tmp_path, monkeypatch):
    """The same captions as the per-batch schedule (`caption` per loader batch, what the first client
    did), with the window kept full across batches: more requests in flight than a batch holds."""
    with EngineSimulator(latency_s=0.05, capacity=8) as engine:
        for root in ("stream", "batch"):
            make_image_shards(tmp_path / root, 3, 5)
        server = {"endpoint": engine.url, "max_concurrency": 8}
        assert _run(_manifest(tmp_path, "stream", server, batch_size=2)) == 0
        streamed_log = list(engine.log)
        monkeypatch.setattr(ServerCaptioner, "streams", False)
        assert _run(_manifest(tmp_path, "batch", server, batch_size=2)) == 0
    streamed, batched = _captions(tmp_path / "stream"), _captions(tmp_path / "batch")
    assert streamed == batched and len(streamed) == 15 and all(len(c) == 2 for c in streamed.values())
    assert _marker(tmp_path / "stream", "000002")["counts"]["failed_requests"] == 0
    # a batch of 2 images is 4 requests: the streamed window had the engine's 8 slots busy at once
    assert _most_in_service(streamed_log) == 8


def _most_in_service(log: list[dict]) -> int:
    events = sorted([(e["started"], 1) for e in log] + [(e["ended"], -1) for e in log])
    most = busy = 0
    for _, change in events:
        busy += change
        most = max(most, busy)
    return most


def test_a_straggler_does_not_delay_the_next_shards_requests(tmp_path):
    keys = make_image_shards(tmp_path / "run", 3, 4)
    slow_key = keys[0][1]
    slow = {_digests(tmp_path / "run", "000000")[slow_key]: 3.0}
    with EngineSimulator(latency_s=0.02, capacity=4, slow=slow) as engine:
        server = {"endpoint": engine.url, "max_concurrency": 4}
        assert _run(_manifest(tmp_path, "run", server, batch_size=4)) == 0
        log = list(engine.log)
    straggler = [e for e in log if e["image"] in slow]
    later = set(_digests(tmp_path / "run", "000001").values()) | set(
        _digests(tmp_path / "run", "000002").values()
    )
    others = [e for e in log if e["image"] in later]
    assert len(straggler) == 2 and len(others) == 16
    # every request of the next shards arrived, and was answered, while the straggler was in service
    assert max(e["ended"] for e in others) < min(e["ended"] for e in straggler)
    done = {u: _marker(tmp_path / "run", u)["finished_at"] for u in ("000000", "000001", "000002")}
    assert done["000001"] < done["000000"] and done["000002"] < done["000000"]


def test_two_endpoints_both_receive_work(tmp_path):
    make_image_shards(tmp_path / "run", 2, 6)
    make_image_shards(tmp_path / "one", 2, 6)
    with EngineSimulator(latency_s=0.03, capacity=2) as a, EngineSimulator(latency_s=0.03, capacity=2) as b:
        server = {"endpoints": [a.url, b.url], "max_concurrency": 2}
        assert _run(_manifest(tmp_path, "run", server)) == 0
        assert len(a.log) >= 8 and len(b.log) >= 8 and len(a.log) + len(b.log) == 24
        assert _run(_manifest(tmp_path, "one", {"endpoint": a.url})) == 0
    assert _captions(tmp_path / "run") == _captions(tmp_path / "one")


def test_sampled_captions_do_not_depend_on_batch_or_window(tmp_path):
    with EngineSimulator(latency_s=0.01, capacity=4) as engine:
        for root, batch, window in (("a", 2, 1), ("b", 5, 6)):
            make_image_shards(tmp_path / root, 2, 5)
            server = {"endpoint": engine.url, "max_concurrency": window}
            manifest = _manifest(tmp_path, root, server, SAMPLE, batch_size=batch, captions_per_image=3)
            assert _run(manifest) == 0
    a, b = _captions(tmp_path / "a"), _captions(tmp_path / "b")
    assert a == b and all(len(c) == 3 and len(set(c)) == 3 for c in a.values())


def test_retry_failed_sends_only_the_failed_images_again(tmp_path, capsys):
    keys = make_image_shards(tmp_path / "run", 2, 4)
    make_image_shards(tmp_path / "clean", 2, 4)
    bad = {_digests(tmp_path / "run", "000001")[keys[1][2]]}
    with EngineSimulator(latency_s=0.01, capacity=4, failing=set(bad)) as engine:
        server = {"endpoint": engine.url, "retries": 0}
        manifest = _manifest(tmp_path, "run", server)
        assert _run(manifest) == 0
        row = _rows(tmp_path / "run")[keys[1][2]]
        assert row["captions"] == [] and row["failure"] == 'HTTP 500: {"error": "injected failure"}'
        assert _marker(tmp_path / "run", "000001")["counts"]["failed_requests"] == 1
        untouched = (tmp_path / "run" / "captions" / "server" / "000000.parquet").stat().st_mtime_ns
        engine.failing.clear()
        engine.log.clear()
        assert _run(manifest, "--retry-failed") == 0
        assert [e["image"] for e in engine.log] == [next(iter(bad))] * 2  # its two prompts only
        assert _run(_manifest(tmp_path, "clean", server)) == 0
    assert _rows(tmp_path / "run") == _rows(tmp_path / "clean")
    assert _marker(tmp_path / "run", "000001")["counts"] == _marker(tmp_path / "clean", "000001")["counts"]
    assert (tmp_path / "run" / "captions" / "server" / "000000.parquet").stat().st_mtime_ns == untouched
    assert "1 failed image(s) of 1 done shard(s) sent again" in capsys.readouterr().err


def test_retry_failed_needs_the_server_backend(tmp_path, capsys):
    make_image_shards(tmp_path / "run", 1, 2)
    manifest = write_caption_manifest(tmp_path, {"backend": "alt_text"})
    assert _run(manifest, "--retry-failed") == 2
    assert "--retry-failed: backend 'alt_text' does not fail per image" in capsys.readouterr().err


def _compared(relative: Path) -> bool:
    return relative.parts[0] == "captions"


@pytest.mark.parametrize("decoding", ["prompts", "sample"])
def test_killed_mid_window_then_rerun_equals_uninterrupted(tmp_path, decoding):
    generation = GREEDY if decoding == "prompts" else SAMPLE
    with EngineSimulator(latency_s=0.06, capacity=2, straggler_fraction=0.2) as engine:
        manifests = {}
        for root in ("straight", "killed"):
            make_image_shards(tmp_path / root, 8, 4)
            server = {"endpoint": engine.url, "max_concurrency": 2}
            manifests[root] = _manifest(tmp_path, root, server, generation, num_workers=2)
        assert _run(manifests["straight"]) == 0
        done = tmp_path / "killed" / "captions" / "server" / "_done"
        run = CliRun(
            ["run", str(manifests["killed"]), "--stage", "caption"], tmp_path, tmp_path / "k.log", cli_env()
        )
        mid_window = lambda: len(list(done.glob("*.json"))) >= 2 and engine.in_service > 0  # noqa: E731
        assert run.wait_for(mid_window, 120) is not None, run.tail()
        killed_at = time.monotonic()
        run.kill_at(0)
        assert len(list(done.glob("*.json"))) < 8, "the kill should have come mid-stage"
        time.sleep(0.5)  # what was in service when the client died is answered into the void
        assert [e for e in engine.log if e["arrived"] < killed_at < e["ended"]], "no request was in flight"
        assert _run(manifests["killed"]) == 0
    expected = tree_content(tmp_path / "straight", _compared)
    assert content_differences(expected, tree_content(tmp_path / "killed", _compared)) == []


def test_serve_per_gpu_starts_one_server_each_and_feeds_both(tmp_path, capsys):
    """`server.gpus`: one task starts a server per listed GPU ({gpu}, free ports), both get work,
    both are stopped when the stage ends."""
    import sys

    make_image_shards(tmp_path / "run", 2, 6)
    serve = f"GPU={{gpu}} {sys.executable} -m tests.helpers.engine_simulator --port {{port}} --latency 0.02"
    server = {"serve": serve, "gpus": ["0", "1"], "max_concurrency": 2, "startup_timeout_s": 60}
    capsys.readouterr()
    assert cli(["-v", "run", str(_manifest(tmp_path, "run", server)), "--stage", "caption"]) == 0
    (sent,) = [line for line in capsys.readouterr().err.splitlines() if "requests per endpoint" in line]
    counts = [int(n) for n in re.findall(r"': (\d+)", sent)]
    assert len(counts) == 2 and all(n >= 6 for n in counts) and sum(counts) == 24, sent
    logs = tmp_path / "run" / "logs" / "caption"
    assert sorted(p.name for p in logs.glob("*.log")) == ["server-rank0-gpu0.log", "server-rank0-gpu1.log"]
    assert all(f"GPU={gpu} " in (logs / f"server-rank0-gpu{gpu}.log").read_text() for gpu in "01")
    assert len(_captions(tmp_path / "run")) == 12
