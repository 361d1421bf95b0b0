"""Issue 15, "verify, don't trust": a marker records its unit's files; damage is reported, then repaired.

One real download (img2dataset against 127.0.0.1, two shards of three) and one alt-text caption run
are made once for the module; each test damages a copy of that run root (copied with its mtimes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from examples.image_server import ImageServer
from pipeline.cli import main as cli
from shards.tars import tar_keys
from shards.verify import keys_digest
from stages.base import DamagedOutput
from stages.layout import RunLayout
from tests.conftest import snapshot, write_url_table


def _write_manifest(folder: Path) -> Path:
    stages = {
        "download": {
            "url_list": "urls.parquet",
            "caption_col": "caption",
            "label_col": "label",
            "samples_per_shard": 3,
            "processes": 1,
            "threads": 4,
            "image_size": 32,
        },
        "caption": {"backend": "alt_text", "batch_size": 4, "num_workers": 0},
    }
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({"run": {"root": "run", "seed": 0}, "stages": stages}))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{"downloaded": folder, "captioned": folder, "cache": the sha256 cache folder}; the image server
    lives for the module, so a shard downloaded again has the same URLs in its metadata."""
    base = tmp_path_factory.mktemp("verify")
    cache = base / "cache"
    with ImageServer() as server:
        downloaded = base / "downloaded"
        downloaded.mkdir()
        urls = [server.url(f"/img/{i}.jpg") for i in range(6)]
        write_url_table(
            downloaded / "urls.parquet", urls, [f"alt {i}" for i in range(6)], [i % 2 for i in range(6)]
        )
        manifest = _write_manifest(downloaded)
        with pytest.MonkeyPatch.context() as patch:  # in this process: img2dataset is imported once
            patch.setenv("MCIP_CACHE_DIR", str(cache))  # for both of the module's downloads
            assert cli(["run", str(manifest), "--stage", "download"]) == 0
            captioned = base / "captioned"
            shutil.copytree(downloaded, captioned)
            assert cli(["run", str(captioned / "m.yaml"), "--stage", "caption"]) == 0
        yield {"downloaded": downloaded, "captioned": captioned, "cache": cache, "server": server}


@pytest.fixture
def copy_of(made, tmp_path, monkeypatch):
    """A fresh copy of one of the module's run folders (mtimes kept): returns (folder, manifest)."""
    monkeypatch.setenv("MCIP_CACHE_DIR", str(made["cache"]))

    def copy(which: str) -> tuple[Path, Path]:
        folder = tmp_path / which
        shutil.copytree(made[which], folder)
        return folder, folder / "m.yaml"

    return copy


def _marker(root: Path, folder: str, unit: str) -> dict:
    return json.loads((root / folder / "_done" / f"{unit}.json").read_text())


def _last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    return lines[-1]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """conftest's snapshot without `manifest.resolved.yaml`: in a copied root its first run
    rewrites it with the copy's paths."""
    return {p: v for p, v in snapshot(root).items() if p != "manifest.resolved.yaml"}


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))


def test_markers_record_each_units_files(made):
    root = made["captioned"] / "run"
    for unit in ("000000", "000001"):
        outputs = _marker(root, "images", unit)["outputs"]
        tar = root / "images" / f"{unit}.tar"
        assert set(outputs) == {f"{unit}.tar", f"{unit}.parquet"}
        record = outputs[f"{unit}.tar"]
        assert record["bytes"] == tar.stat().st_size and record["samples"] == 3
        assert record["keys_sha256"] == keys_digest(tar_keys(tar))
        assert record["sha256"] == _marker(root, "images", unit)["tar_sha256"]
        assert outputs[f"{unit}.parquet"]["rows"] == 3
        captions = _marker(root, "captions/alt_text", unit)["outputs"][f"{unit}.parquet"]
        # caption shards are keyed by image key: the same keys digest as the image shard
        assert captions["rows"] == 3 and captions["keys_sha256"] == record["keys_sha256"]


def _cut(tar: Path, other: Path) -> None:
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])  # in the middle of a member


def _delete(tar: Path, other: Path) -> None:
    tar.unlink()


def _copy_other(tar: Path, other: Path) -> None:
    shutil.copyfile(other, tar)  # a new mtime; tars are padded to 10 KiB records: same size


@pytest.mark.parametrize(
    "damage,what",
    [
        (_cut, "size"),
        (_delete, "is missing"),
        (_copy_other, "holds other keys than its marker records"),
    ],
)
def test_a_damaged_image_shard_stops_each_stage_and_plan_names_it(copy_of, capsys, damage, what):
    folder, manifest = copy_of("downloaded")
    root = folder / "run"
    damage(root / "images" / "000000.tar", root / "images" / "000001.tar")
    before = _snapshot(root)

    assert cli(["plan", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "download: 2 units, 1 done, 1 pending, 1 damaged (need --repair)" in out
    assert f"damaged unit 000000: {root / 'images' / '000000.tar'}" in out and what in out
    assert f"caption: waiting (download unit 000000: {root / 'images' / '000000.tar'}" in out
    assert f"`mcip run {manifest} --repair` redoes" in out

    assert cli(["status", str(manifest), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["download"]["units_done"] == 1 and not status["download"]["is_complete"]
    assert list(status["download"]["damaged"]) == ["000000"]

    for command in (["run", str(manifest)], ["run", str(manifest), "--stage", "caption"]):
        assert cli(command) == 2
        last = _last_error(capsys)
        assert last.startswith(f"error: download unit 000000: {root / 'images' / '000000.tar'}")
        assert what in last and last.endswith(f"`mcip run {manifest} --repair` redoes it")
    assert not (root / "captions").exists()  # no captions written under another shard's keys
    assert _snapshot(root) == before


def test_a_full_check_finds_a_copy_that_kept_size_and_mtime(copy_of):
    """What a reader gets from `CompleteStage.verify` when the quick check cannot see the change."""
    folder, _ = copy_of("downloaded")
    root = folder / "run"
    tar = root / "images" / "000000.tar"
    mtime_ns = tar.stat().st_mtime_ns
    shutil.copyfile(root / "images" / "000001.tar", tar)
    os.utime(tar, ns=(mtime_ns, mtime_ns))
    images = RunLayout(root).downloaded()  # quick check: size and mtime as recorded
    images.verify(["000001"])
    with pytest.raises(DamagedOutput) as caught:
        images.verify(["000000", "000001"])
    assert str(caught.value) == (
        f"download unit 000000: {tar} holds other keys than its marker records; "
        "`mcip run MANIFEST --repair` redoes it"
    )


def _garbage(parquet: Path) -> None:
    parquet.write_bytes(b"\0" * parquet.stat().st_size)  # same size: caught by the new mtime


@pytest.mark.parametrize(
    "damage,what",
    [(Path.unlink, "is missing"), (_garbage, "is not a readable parquet table")],
)
def test_a_damaged_caption_shard_is_reported_then_repaired(copy_of, capsys, damage, what):
    folder, manifest = copy_of("captioned")
    root = folder / "run"
    shard = root / "captions" / "alt_text" / "000001.parquet"
    original = shard.read_bytes()
    damage(shard)
    before = _snapshot(root)

    assert cli(["plan", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "download: 2 units, 2 done, 0 pending" in out
    assert "caption: 2 units, 1 done, 1 pending, 1 damaged (need --repair)" in out
    assert f"damaged unit 000001: {shard} {what}" in out
    assert cli(["status", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "caption: 1/2 units done; " in out and "images 3" in out and "; 1 damaged" in out
    assert f"damaged unit 000001: {shard} {what}" in out

    for command in (
        ["run", str(manifest)],
        ["export", str(manifest), "--captions", "alt_text", "--to", str(folder / "export")],
    ):
        assert cli(command) == 2
        last = _last_error(capsys)
        assert last.startswith(f"error: caption unit 000001: {shard} {what}"), last
        assert last.endswith(f"`mcip run {manifest} --repair` redoes it")
    assert _snapshot(root) == before and not (folder / "export").exists()

    assert cli(["run", str(manifest), "--repair"]) == 0
    after = _snapshot(root)
    assert _changed(before, after) == [
        "captions/alt_text/000001.parquet",
        "captions/alt_text/_SUCCESS.json",
        "captions/alt_text/_done/000001.json",
    ]
    assert shard.read_bytes() == original
    assert cli(["run", str(manifest), "--repair"]) == 0  # nothing damaged: nothing redone
    assert _snapshot(root) == after


def test_repair_redoes_only_the_damaged_image_shard(copy_of, made, capsys):
    folder, manifest = copy_of("downloaded")
    root = folder / "run"
    tar = root / "images" / "000001.tar"
    original = tar.read_bytes()
    tar.write_bytes(original[:5000])
    before = _snapshot(root)
    assert cli(["run", str(manifest), "--stage", "download", "--repair"]) == 0
    assert "download unit 000001: " in (err := capsys.readouterr().err) and "redoing it (--repair)" in err
    changed = _changed(before, _snapshot(root))
    assert {"images/000001.tar", "images/_done/000001.json"} <= set(changed)
    assert not [p for p in changed if "000000" in p]  # the intact shard: same bytes, same mtimes
    assert tar.read_bytes() == original


def test_markers_without_a_record_are_trusted_but_need_their_files(copy_of, capsys):
    """Markers written before records existed: counted done as before; a reader still needs the file."""
    folder, manifest = copy_of("captioned")
    root = folder / "run"
    for marker in sorted(root.glob("**/_done/*.json")):
        payload = json.loads(marker.read_text())
        del payload["outputs"]
        marker.write_text(json.dumps(payload))
    with open(root / "captions" / "alt_text" / "000000.parquet", "ab") as handle:
        handle.write(b"appended")
    assert cli(["plan", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "download: 2 units, 2 done, 0 pending" in out and "caption: 2 units, 2 done, 0 pending" in out
    (root / "images" / "000001.tar").unlink()
    assert cli(["run", str(manifest), "--stage", "caption"]) == 2
    assert _last_error(capsys).startswith(
        f"error: download unit 000001: {root / 'images' / '000001.tar'} is missing"
    )
