"""The download stage with real img2dataset against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shards.identity import file_sha256
from shards.reader import iter_samples
from shards.tars import read_tar_samples
from tests.conftest import cli_env, run_cli, snapshot, write_manifest, write_url_table


def _bad_rows_table(folder: Path, server) -> dict:
    """12 good pictures, one duplicated URL and five bad rows; returns the expected outcome."""
    urls = [server.url(f"/img/{i}.jpg") for i in range(12)]
    urls += [
        server.url("/img/3.jpg"),
        server.url("/missing.jpg"),
        server.url("/page.html"),
        server.url("/truncated.jpg"),
        server.url("/huge.png"),
        "",
    ]
    captions = [f"caption {i}" for i in range(len(urls))]
    labels = ["cat", "dog", "eel"] * 6
    write_url_table(folder / "urls.parquet", urls, captions, labels)
    return {
        "rows": len(urls),
        "ok": 13,
        "failed": 5,
        "captions": captions,
        "labels": labels,
        "failed_by_reason": {"http 404": 1, "not a decodable image": 2, "image too large": 1, "bad url": 1},
    }


def _done(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "images" / "_done").glob("*.json"))}


def _key_hashes(root: Path) -> set[tuple[str, str]]:
    tars = sorted((root / "images").glob("*.tar"))
    return {(s["__key__"], hashlib.sha256(s["jpg"]).hexdigest()) for s in iter_samples(tars)}


def _assert_done_tars_are_complete(root: Path) -> None:
    for unit, marker in _done(root).items():
        tar = root / "images" / f"{unit}.tar"
        assert file_sha256(tar) == marker["tar_sha256"], f"{tar} differs from its marker"
        assert len(read_tar_samples(tar)) == marker["counts"]["ok"]


@pytest.fixture
def bad_rows_run(tmp_path, image_server):
    expected = _bad_rows_table(tmp_path, image_server)
    # the last shard's 3 rows all fail: accepted here, refused by the default (see below)
    manifest = write_manifest(
        tmp_path, {"caption_col": "caption", "label_col": "label", "max_failed_fraction": 1.0}
    )
    result = run_cli("run", str(manifest), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return tmp_path, manifest, expected, result


def test_counts_keys_labels_and_captions(bad_rows_run):
    folder, manifest, expected, result = bad_rows_run
    root = folder / "run"
    success = json.loads((root / "images" / "_SUCCESS.json").read_text())
    assert success["counts"]["ok"] == expected["ok"]
    assert success["counts"]["failed"] == expected["failed"]
    assert success["counts"]["failed_by_reason"] == expected["failed_by_reason"]
    assert sorted(_done(root)) == ["000000", "000001", "000002", "000003"]
    assert "13 ok, 5 failed" in result.stderr
    labels = json.loads((root / "images" / "labels.json").read_text())["labels"]
    assert labels == ["cat", "dog", "eel"]
    samples = list(iter_samples(sorted((root / "images").glob("*.tar"))))
    assert len(samples) == expected["ok"]
    for sample in samples:
        row = int(sample["__key__"])
        assert sample["txt"].decode() == expected["captions"][row]
        assert labels[int(sample["cls"])] == expected["labels"][row]
        assert json.loads(sample["json"])["key"] == sample["__key__"]
    status = pq.read_table(root / "images" / "000002.parquet").to_pydict()
    assert status["key"] == [f"{r:09d}" for r in range(10, 15)]
    assert status["status"][3] == "failed_to_download"  # row 13: the 404
    index = json.loads((root / "images" / "_index.json").read_text())
    assert sum(s["nsamples"] for s in index["shardlist"]) == expected["ok"]


def test_status_and_plan_report_counts(bad_rows_run):
    folder, manifest, expected, _ = bad_rows_run
    status = json.loads(run_cli("status", str(manifest), "--json", cwd=folder).stdout)["download"]
    assert (status["units_done"], status["units_total"], status["is_complete"]) == (4, 4, True)
    assert (status["counts"]["ok"], status["counts"]["failed"]) == (13, 5)
    assert "download: 4 units, 4 done, 0 pending" in run_cli("plan", str(manifest), cwd=folder).stdout


def test_rerun_after_success_rewrites_nothing(bad_rows_run):
    folder, manifest, _, _ = bad_rows_run
    before = snapshot(folder / "run")
    result = run_cli("run", str(manifest), cwd=folder)
    assert result.returncode == 0, result.stderr
    assert snapshot(folder / "run") == before


def test_deleting_one_marker_redoes_only_that_shard(bad_rows_run):
    folder, manifest, _, _ = bad_rows_run
    root = folder / "run"
    hashes = _key_hashes(root)
    (root / "images" / "_done" / "000001.json").unlink()
    before = snapshot(root)
    assert run_cli("run", str(manifest), cwd=folder).returncode == 0
    after = snapshot(root)
    changed = sorted(p for p in after if after[p] != before.get(p))
    assert changed == ["images/000001.parquet", "images/000001.tar", "images/_done/000001.json"]
    assert _key_hashes(root) == hashes


def test_a_crash_before_the_shard_index_is_written_is_repaired_by_the_next_run(bad_rows_run, monkeypatch):
    """A redone shard makes `_index.json` stale: a run stopped after the shard's marker but before
    the index leaves an index older than that marker, and the next run (nothing left to download)
    writes it again from the markers."""
    import stages.download as download
    from pipeline.cli import main as cli

    folder, manifest, _, _ = bad_rows_run
    images = folder / "run" / "images"
    expected = json.loads((images / "_index.json").read_text())
    (images / "_index.json").write_text('{"stale": true}')  # as an index of older shards would be
    (images / "_done" / "000001.json").unlink()

    def killed(*args):
        raise KeyboardInterrupt("killed before the index")

    monkeypatch.chdir(folder)
    with monkeypatch.context() as patched:
        patched.setattr(download, "_write_index", killed)
        assert cli(["run", str(manifest)]) == 130  # as the CLI ends on an interrupt
    assert (images / "_done" / "000001.json").exists()
    assert json.loads((images / "_index.json").read_text()) == {"stale": True}
    assert run_cli("run", str(manifest), cwd=folder).returncode == 0
    assert json.loads((images / "_index.json").read_text()) == expected


def test_changed_setting_is_refused_then_forced(bad_rows_run):
    folder, manifest, _, _ = bad_rows_run
    settings = {"caption_col": "caption", "label_col": "label", "max_failed_fraction": 1.0, "image_size": 24}
    changed = write_manifest(folder, settings)
    refused = run_cli("run", str(changed), cwd=folder)
    assert refused.returncode == 2
    assert "image_size: 32 -> 24" in refused.stderr and "--force" in refused.stderr
    assert run_cli("run", str(changed), "--force", cwd=folder).returncode == 0
    assert all(m["settings"]["image_size"] == 24 for m in _done(folder / "run").values())


def _slow_table(folder: Path, server, rows: int = 40) -> None:
    write_url_table(
        folder / "urls.parquet",
        [server.url(f"/slow/{i}.jpg") for i in range(rows)],
        labels=[i % 4 for i in range(rows)],
    )


def test_retry_failed_downloads_only_failed_rows_into_new_shards(tmp_path, image_server):
    urls = [image_server.url(f"/img/{i}.jpg") for i in range(6)]
    urls += [image_server.url(f"/flaky/{i}.jpg") for i in range(3)] + [image_server.url("/missing.jpg")]
    write_url_table(tmp_path / "urls.parquet", urls)
    manifest = write_manifest(tmp_path, {"max_failed_fraction": 1.0})  # shard 1: 4 of 5 rows fail at first
    assert run_cli("run", str(manifest), cwd=tmp_path).returncode == 0
    root = tmp_path / "run"
    before = snapshot(root / "images")

    result = run_cli("run", str(manifest), "--retry-failed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    done = _done(root)
    assert sorted(done) == ["000000", "000001", "000002"]
    assert done["000002"]["kind"] == "retry" and done["000002"]["counts"]["ok"] == 3
    retried = pq.read_table(root / "images" / "000002.parquet").to_pydict()
    assert retried["key"] == [f"{r:09d}" for r in (6, 7, 8, 9)]
    for name in ("000000.tar", "000001.tar", "000000.parquet", "000001.parquet"):
        assert snapshot(root / "images")[name] == before[name]
    status = json.loads(run_cli("status", str(manifest), "--json", cwd=tmp_path).stdout)["download"]
    assert (status["counts"]["ok"], status["counts"]["failed"]) == (9, 1)
    assert {k for k, _ in _key_hashes(root)} == {f"{r:09d}" for r in range(9)}


def test_two_ranks_split_shards_without_overlap(tmp_path, image_server):
    write_url_table(tmp_path / "urls.parquet", [image_server.url(f"/img/{i}.jpg") for i in range(20)])
    manifest = write_manifest(tmp_path, {})
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", str(manifest)],
            cwd=tmp_path,
            env=cli_env(RANK=str(r), WORLD_SIZE="2"),
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for process in ranks:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    done = _done(tmp_path / "run")
    assert {unit: m["rank"] for unit, m in done.items()} == {f"{i:06d}": i % 2 for i in range(4)}
    assert len(_key_hashes(tmp_path / "run")) == 20
    assert (tmp_path / "run" / "images" / "_SUCCESS.json").exists()


def test_a_mostly_failed_shard_stops_the_stage_with_its_reasons(tmp_path, image_server):
    """img2dataset#451: a run where most rows fail is an error, not a success with a small count."""
    urls = [image_server.url(f"/img/{i}.jpg") for i in range(5)] + [image_server.url("/missing.jpg")] * 3
    urls += [image_server.url("/img/5.jpg"), ""]
    write_url_table(tmp_path / "urls.parquet", urls)
    manifest = write_manifest(tmp_path, {})  # shard 1: 4 of 5 rows fail, above the default 0.5
    result = run_cli("run", str(manifest), cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert (
        "shard 000001: 4 of 5 rows failed (http 404: 3, bad url: 1)" in last and "max_failed_fraction" in last
    )
    assert sorted(_done(tmp_path / "run")) == ["000000"]
    assert not (tmp_path / "run" / "images" / "000001.tar").exists()
    assert not (tmp_path / "run" / "images" / "_SUCCESS.json").exists()
    manifest = write_manifest(tmp_path, {"max_failed_fraction": 0.9})  # speed-like knob: no --force needed
    assert run_cli("run", str(manifest), cwd=tmp_path).returncode == 0
    assert sorted(_done(tmp_path / "run")) == ["000000", "000001"]


def test_a_url_table_without_rows_is_an_error(tmp_path):
    write_url_table(tmp_path / "urls.parquet", [])
    result = run_cli("run", str(write_manifest(tmp_path, {})), cwd=tmp_path)
    assert result.returncode == 2 and "urls.parquet: the URL table has no rows" in result.stderr
    assert not (tmp_path / "run" / "images" / "_SUCCESS.json").exists()
