"""How the index stage reads its image shards: each tar once, in the DataLoader worker that takes it
(stages/index/embed.py `ShardPictures`: the member headers, then each picture at its offset).

Real tars and a tiny random CLIP: every stored vector is its own key's picture embedded; a shard
whose samples do not pair up with pictures, or that is cut off, stops the stage with one line
naming the file and writes no marker for it; an oversized picture is counted, not read."""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import replace
from multiprocessing import active_children
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from examples.image_server import generated_jpeg
from pipeline.cli import main as cli
from shards import markers
from stages.caption.images import decode_image
from stages.index import embed
from stages.index.embed import ShardPictures
from tests.conftest import FAKE_MARKER
from tests.helpers.index_run import CORRUPT, write_index_manifest, write_shards
from tests.helpers.open_clip_families import FAMILIES, save_family

LOADER = embed._loader  # the real one, before a test wraps it


def _manifest(folder: Path, tiny_models: dict, **index) -> Path:
    models = [{"name": "base", "checkpoint": str(tiny_models["clip_checkpoint"])}]
    return write_index_manifest(folder, tiny_models, models=models, texts=False, **index)


def _stage(manifest: Path) -> Path:
    return manifest.parent / "run" / "index" / "index"


def _replace_shard(images: Path, unit: str, data: bytes) -> None:
    """A tar's bytes as given, with a download marker that matches them (so only the reader sees it)."""
    (images / f"{unit}.tar").write_bytes(data)
    info = {"samples": 6, "tar_bytes": len(data), "tar_sha256": hashlib.sha256(data).hexdigest()}
    markers.write_marker(images, unit, {**FAKE_MARKER, "unit": unit, "counts": {"ok": 6}, **info})


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("workers, early", [(0, "built"), (2, "built"), (2, "differs"), (2, "fails")])
def test_each_vector_is_its_own_keys_picture_embedded(tmp_path, tiny_models, monkeypatch, workers, early):
    """`early`: the transform the workers start with before the weights load (models_and_batches):
    open_clip's, one that differs from the loaded model's (the loader is started again with the
    model's), or none (the workers start after the weights)."""
    from captioning import clip_models
    from captioning.clip_models import load_clip

    if early == "differs":
        real = clip_models.eval_transform(tiny_models["clip_arch"], None, tiny_models["clip_configs"])
        config = {**real.config, "mean": (0.0, 0.0, 0.0)}
        wrong = replace(
            real, preprocess=image_transform_v2(PreprocessCfg(**config), is_train=False), config=config
        )
        monkeypatch.setattr(clip_models, "eval_transform", lambda *args: wrong)
    elif early == "fails":
        monkeypatch.setattr(clip_models, "eval_transform", lambda *args: None)
    before, load, loaders = {p.pid for p in active_children()}, embed.load_models, []
    started_while_loading = []
    monkeypatch.setattr(embed, "_loader", lambda *a: (loaders.append(a[2]), LOADER(*a))[1])
    monkeypatch.setattr(
        embed,
        "load_models",
        lambda *a: (started_while_loading.append({p.pid for p in active_children()} - before), load(*a))[1],
    )
    write_shards(tmp_path / "run", shards=3, per_shard=5)
    manifest = _manifest(tmp_path, tiny_models, num_workers=workers)
    assert cli(["run", str(manifest)]) == 0
    assert [len(pids) for pids in started_while_loading] == [workers if early != "fails" else 0]
    assert len(loaders) == {"built": 1, "differs": 2, "fails": 1}[early]  # started again only on a difference
    clip = load_clip(tiny_models["clip_arch"], tiny_models["clip_checkpoint"], tiny_models["clip_configs"])
    for unit in ("000000", "000001", "000002"):
        keys = pq.read_table(_stage(manifest) / "meta" / f"{unit}.parquet").column("key").to_pylist()
        assert keys == [f"{n:09d}" for n in range(int(unit) * 5, int(unit) * 5 + 5) if f"{n:09d}" != CORRUPT]
        pictures = [decode_image(generated_jpeg(int(key)), clip.image_size) for key in keys]
        expected = clip.encode_images(torch.stack([clip.preprocess(p) for p in pictures])).numpy()
        stored = np.load(_stage(manifest) / "base" / "vectors" / f"{unit}.npy").astype(np.float32)
        assert np.allclose(stored, expected, atol=2e-3)
        assert not np.allclose(stored, np.roll(expected, 1, axis=0), atol=2e-3)  # rows are told apart


def _damaged_tar(damage: str) -> bytes:
    """Shard 000001 of `write_shards(per_shard=6)` (keys 6-11, a .jpg and a .txt each), damaged."""
    members = [(f"{n:09d}.{ext}", generated_jpeg(n)) for n in range(6, 12) for ext in ("jpg", "txt")]
    if damage == "a sample without its picture":
        members.remove(("000000008.jpg", generated_jpeg(8)))
    elif damage == "two pictures under one key":
        members.insert(4, ("000000007.jpg", generated_jpeg(7)))
    data = _tar(members)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        at = {m.name: m for m in archive}
    if damage == "cut off inside a picture":
        return data[: at["000000009.jpg"].offset_data + 10]
    if damage == "cut off between members":
        return data[: at["000000010.jpg"].offset]
    if damage == "a header overwritten":
        start = at["000000010.jpg"].offset
        return data[:start] + b"\x01" * 512 + data[start + 512 :]
    if damage == "a negative size":
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for name, body in members:
                info = tarfile.TarInfo(name)
                info.size, info.pax_headers = len(body), {"size": "-512"} if name == "000000009.txt" else {}
                archive.addfile(info, io.BytesIO(body))
        return out.getvalue()
    return data


@pytest.mark.parametrize(
    "damage, line",
    [
        ("a sample without its picture", "000001.tar: sample '000000008' has no .jpg member"),
        ("two pictures under one key", "000001.tar: sample '000000007' has two .jpg members"),
        ("cut off inside a picture", "000001.tar: damaged image shard (unexpected end of data)"),
        ("cut off between members", "000001.tar: no tar header or end-of-archive block at byte"),
        ("a header overwritten", "000001.tar: no tar header or end-of-archive block at byte"),
        ("a negative size", "000001.tar: member '000000009.txt' has a bad header (size -512"),
    ],
)
def test_a_damaged_shard_stops_the_stage_with_one_line_naming_it(tmp_path, tiny_models, capsys, damage, line):
    write_shards(tmp_path / "run", shards=2, per_shard=6)
    _replace_shard(tmp_path / "run" / "images", "000001", _damaged_tar(damage))
    manifest = _manifest(tmp_path, tiny_models, num_workers=1)
    assert cli(["run", str(manifest)]) == 2
    err = capsys.readouterr().err
    named = [row for row in err.splitlines() if "000001.tar" in row]
    assert len(named) == 1 and line in named[0] and "run --repair" in named[0] and "Traceback" not in err
    assert not markers.marker_path(_stage(manifest), "000001").exists()


def test_a_tar_cut_between_the_header_pass_and_the_reads_is_a_one_line_reason(tmp_path, monkeypatch):
    write_shards(tmp_path, shards=1, per_shard=6)
    tar = tmp_path / "images" / "000000.tar"
    members = embed.scan_tar(tar)
    cut = members["000000003"].offset + 10
    monkeypatch.setattr(embed, "scan_tar", lambda path: (tar.write_bytes(tar.read_bytes()[:cut]), members)[1])
    shard = ShardPictures(tar)
    assert [s["__key__"] for s in shard] == ["000000000", "000000001", "000000002"]
    assert shard.info == f"{tar}: cut off inside 000000003.jpg; `run --repair` redoes it"


def test_a_picture_over_the_size_bound_is_counted_as_undecodable_not_read(tmp_path, tiny_models, monkeypatch):
    write_shards(tmp_path / "run", shards=1, per_shard=6)
    sizes = {key: m.size for key, m in embed.scan_tar(tmp_path / "run" / "images" / "000000.tar").items()}
    big = max(sizes, key=sizes.get)
    monkeypatch.setattr(embed, "MAX_PICTURE_BYTES", sizes[big] - 1)
    assert sum(size >= sizes[big] for size in sizes.values()) == 1
    manifest = _manifest(tmp_path, tiny_models)
    assert cli(["run", str(manifest)]) == 0
    done = markers.read_marker(_stage(manifest), "000000")
    assert done["counts"] == {"images": 4, "corrupt_images": 2}  # the bound's and CORRUPT
    keys = pq.read_table(_stage(manifest) / "meta" / "000000.parquet").column("key").to_pylist()
    assert big not in keys and CORRUPT not in keys and len(keys) == 4


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_transform_built_before_the_weights_is_the_loaded_models(tmp_path, name):
    from captioning.clip_models import eval_transform, load_clip

    arch, checkpoint, configs = save_family(FAMILIES[name], tmp_path)
    early = eval_transform(arch, checkpoint, configs)
    loaded = load_clip(arch, checkpoint, configs)
    assert (early.config, early.image_size) == (loaded.model.visual.preprocess_cfg, loaded.image_size)
    picture = decode_image(generated_jpeg(3), early.image_size)
    assert torch.equal(early.preprocess(picture), loaded.preprocess(picture))
    assert eval_transform(f"hf-hub:org/{arch}") is None  # its config is on the hub: never fetched here


def test_a_pretrained_tag_gives_its_own_preprocess_settings_and_downloads_nothing(monkeypatch):
    import open_clip.factory

    from captioning.clip_models import eval_transform

    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *a, **k: pytest.fail("downloaded"))
    siglip, openai = eval_transform("ViT-B-16-SigLIP", "webli"), eval_transform("ViT-B-32", "openai")
    assert (siglip.config["mean"], siglip.config["resize_mode"]) == ((0.5, 0.5, 0.5), "squash")
    assert (openai.config["mean"][0], openai.config["resize_mode"]) == (0.48145466, "shortest")
    assert siglip.image_size == openai.image_size == 224
