"""The caption stage with tiny BLIP, BLIP-2, LLaVA and open_clip models (random weights, loaded by path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from captioning.bank_search import FP16_COSINE_TOLERANCE, BankTexts
from pipeline.cli import main as cli
from shards.captions import SCHEMA
from shards.reader import iter_samples
from stages.caption.images import decode_image
from tests.conftest import cli_env, make_image_shards, snapshot, write_caption_manifest


def _rows(root: Path, tag: str, unit: str) -> list[dict]:
    return pq.read_table(root / "captions" / tag / f"{unit}.parquet").to_pylist()


def _run(manifest: Path, *extra: str) -> int:
    return cli(["run", str(manifest), "--stage", "caption", *extra])


def _generation(k: int | None = None, **generation) -> dict:
    """Caption settings for short generations; `generation` keys go into the `generation:` section."""
    return {
        "generation": {"max_new_tokens": 6, "min_new_tokens": 4, **generation},
        "filter": {"min_words": 0, "dedupe": False},
        **({"captions_per_image": k} if k else {}),
    }


def test_blip_sampling_writes_k_captions_per_image_in_key_order(tmp_path, tiny_models):
    keys = make_image_shards(tmp_path / "run", shards=2, per_shard=4, corrupt=(5,))
    manifest = write_caption_manifest(
        tmp_path, {"backend": "blip", "model": str(tiny_models["blip"]), "num_workers": 2, **_generation(k=3)}
    )
    assert _run(manifest) == 0
    for unit, unit_keys in zip(("000000", "000001"), keys):
        table = pq.read_table(tmp_path / "run" / "captions" / "blip" / f"{unit}.parquet")
        assert table.schema.equals(SCHEMA)
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == unit_keys
        for row in rows:
            assert len(row["captions"]) == (0 if row["key"] == "000000005" else 3)
            assert row["scores"] is None and row["backend"] == "blip" and row["seed"] == 0
            assert row["model"] == str(tiny_models["blip"])
    marker = json.loads((tmp_path / "run" / "captions" / "blip" / "_done" / "000001.json").read_text())
    assert marker["counts"] == {"images": 4, "captions": 9, "images_without_captions": 1, "corrupt_images": 1}


@pytest.mark.parametrize(
    "backend,model,options,per_image",
    [
        ("blip", "blip2", {"decoding": "beam", "k": 2}, 2),
        (
            "llava",
            "llava",
            {"decoding": "prompts", "prompts": ["Describe the image in one sentence.", "what is this"]},
            2,
        ),
        ("llava", "llava", {"decoding": "sample", "k": 3}, 3),
    ],
)
def test_blip2_and_llava(tmp_path, tiny_models, backend, model, options, per_image):
    make_image_shards(tmp_path / "run", shards=1, per_shard=3)
    manifest = write_caption_manifest(
        tmp_path,
        {"backend": backend, "model": str(tiny_models[model]), "captions": model, **_generation(**options)},
    )
    assert _run(manifest) == 0
    rows = _rows(tmp_path / "run", model, "000000")
    assert [len(r["captions"]) for r in rows] == [per_image] * 3
    assert rows[0]["prompts"] == options.get(
        "prompts", ["Describe the image in one sentence."] if backend == "llava" else []
    )
    for row in rows:  # the prompt is stripped from the output
        assert not any(c.startswith(("USER:", "Describe the image")) for c in row["captions"])


def _decoded_pixels(root: Path, clip) -> tuple[list[str], torch.Tensor]:
    """Pixels as the stage decodes them (JPEG draft scaling to the model's input size)."""
    samples = list(iter_samples(sorted((root / "images").glob("*.tar"))))
    pixels = torch.stack([clip.preprocess(decode_image(s["jpg"], clip.image_size)) for s in samples])
    return [s["__key__"] for s in samples], pixels


def _retrieval_manifest(folder: Path, tiny_models: dict, bank: Path, **extra) -> Path:
    retrieval = {
        "pretrained": str(tiny_models["clip_checkpoint"]),
        "config_dir": str(tiny_models["clip_configs"]),
        "bank": str(bank),
        **extra,
    }
    return write_caption_manifest(
        folder,
        {
            "backend": "retrieval",
            "model": tiny_models["clip_arch"],
            "captions_per_image": 4,
            "retrieval": retrieval,
        },
    )


def test_retrieval_equals_brute_force_top_k_above_threshold(tmp_path, tiny_models):
    from captioning.clip_models import load_clip

    make_image_shards(tmp_path / "run", shards=2, per_shard=5)
    phrases = [
        f"a {c} {s} on {b}"
        for c in ("red", "blue", "green")
        for s in ("circle", "square")
        for b in ("cyan", "dark")
    ]
    bank = tmp_path / "bank.txt"
    bank.write_text("\n".join(phrases + phrases[:4] + [""]) + "\n")  # exact duplicates and an empty line
    clip = load_clip(
        tiny_models["clip_arch"], str(tiny_models["clip_checkpoint"]), tiny_models["clip_configs"]
    )
    keys, pixels = _decoded_pixels(tmp_path / "run", clip)
    sims = clip.encode_images(pixels).numpy() @ clip.encode_texts(phrases).T
    threshold = float(np.quantile(sims, 0.6))
    manifest = _retrieval_manifest(tmp_path, tiny_models, bank, threshold=threshold)
    assert _run(manifest) == 0

    rows = _rows(tmp_path / "run", "retrieval", "000000") + _rows(tmp_path / "run", "retrieval", "000001")
    assert [r["key"] for r in rows] == keys
    tol = 2 * FP16_COSINE_TOLERANCE  # the bank is stored in fp16: ties within this may swap
    for row, sim in zip(rows, sims):
        order = np.argsort(-sim, kind="stable")[:4]
        want = [(phrases[i], sim[i]) for i in order if sim[i] > threshold]
        got = dict(zip(row["captions"], row["scores"]))
        assert len(got) == len(row["captions"])
        for (phrase, score), (other, _) in zip(want, zip(row["captions"], row["scores"])):
            exact = sim[phrases.index(other)]
            assert phrase == other or abs(exact - score) <= tol, (phrase, other)
            assert abs(got[other] - exact) <= FP16_COSINE_TOLERANCE
        assert abs(len(row["captions"]) - len(want)) <= sum(abs(s - threshold) <= tol for s in sim)
    assert any(len(r["captions"]) < 4 for r in rows) and any(len(r["captions"]) == 4 for r in rows)
    cached = list((tmp_path / "run" / "caption_bank").glob("*/000000.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (len(phrases), 32)
    assert np.load(cached[0]).dtype == np.float16
    texts = list((tmp_path / "run" / "caption_bank").glob("*/texts.arrow"))
    assert len(texts) == 1 and BankTexts(texts[0]).slice(0, len(phrases)) == phrases


def test_retrieval_captions_do_not_depend_on_how_images_are_grouped_for_search(tmp_path, tiny_models):
    """The bank is searched once per `query_batch` images across loader batches of 4 (with a corrupt
    image among them); one image per search gives the same shards, bit for bit. (The loader's batches
    themselves stay the same: an image encoder's float32 output depends on its batch in the last bits,
    which is why batches never span shards.)"""
    bank = tmp_path / "bank.txt"
    bank.write_text(
        "\n".join(f"a {c} {s} number {i}" for i in range(40) for c in ("red", "blue") for s in "ab")
    )
    rows = {}
    for name, extra in (("grouped", {}), ("one-by-one", {"query_batch": 1})):
        folder = tmp_path / name
        make_image_shards(folder / "run", shards=2, per_shard=5, corrupt=(3,))
        manifest = _retrieval_manifest(folder, tiny_models, bank, threshold=-1.0, **extra)
        assert _run(manifest) == 0
        rows[name] = [_rows(folder / "run", "retrieval", u) for u in ("000000", "000001")]
    assert rows["grouped"] == rows["one-by-one"]
    assert sum(len(r["captions"]) == 4 for shard in rows["grouped"] for r in shard) == 9  # one corrupt


def test_score_with_min_score_and_keep_top(tmp_path, tiny_models):
    from captioning.clip_models import load_clip

    make_image_shards(tmp_path / "run", shards=1, per_shard=3)
    clip_spec = {
        "model": tiny_models["clip_arch"],
        "pretrained": str(tiny_models["clip_checkpoint"]),
        "config_dir": str(tiny_models["clip_configs"]),
    }
    scoring = {**clip_spec, "min_score": -1.0, "keep_top": 2}
    manifest = write_caption_manifest(
        tmp_path,
        {
            "backend": "blip",
            "model": str(tiny_models["blip"]),
            "scoring": scoring,
            **_generation(k=4, decoding="beam"),
        },
    )
    assert _run(manifest) == 0
    rows = _rows(tmp_path / "run", "blip", "000000")
    clip = load_clip(clip_spec["model"], clip_spec["pretrained"], clip_spec["config_dir"])
    _, pixels = _decoded_pixels(tmp_path / "run", clip)
    image_embeddings = clip.encode_images(pixels).numpy()
    for row, image in zip(rows, image_embeddings):
        assert len(row["captions"]) == 2 and row["scores"] == sorted(row["scores"], reverse=True)
        np.testing.assert_allclose(row["scores"], clip.encode_texts(row["captions"]) @ image, atol=1e-5)


def test_rerun_is_a_noop_and_a_deleted_marker_redoes_one_shard(tmp_path):
    make_image_shards(tmp_path / "run", shards=3, per_shard=2)
    manifest = write_caption_manifest(tmp_path, {"backend": "alt_text"})
    assert _run(manifest) == 0
    assert _rows(tmp_path / "run", "alt_text", "000001")[0]["captions"] == ["alt 2"]
    before = snapshot(tmp_path / "run")
    assert _run(manifest) == 0
    assert snapshot(tmp_path / "run") == before
    (tmp_path / "run" / "captions" / "alt_text" / "_done" / "000002.json").unlink()
    assert _run(manifest) == 0
    after = snapshot(tmp_path / "run")
    changed = sorted(p for p in after if after[p] != before.get(p))
    assert changed == ["captions/alt_text/000002.parquet", "captions/alt_text/_done/000002.json"]


def test_kill_mid_stage_then_resume_equals_uninterrupted(tmp_path, tiny_models):
    caption = {
        "backend": "blip",
        "model": str(tiny_models["blip"]),
        "num_workers": 1,
        **_generation(k=2, decoding="beam"),
    }
    for root in ("straight", "killed"):
        make_image_shards(tmp_path / root, shards=16, per_shard=6)
        write_caption_manifest(tmp_path, caption, root=root, name=f"{root}.yaml")
    assert _run(tmp_path / "straight.yaml") == 0

    done = tmp_path / "killed" / "captions" / "blip" / "_done"
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.caption", str(tmp_path / "killed.yaml")],
        cwd=tmp_path,
        env=cli_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(done.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = len(list(done.glob("*.json")))
    assert 1 <= done_at_kill < 16, "the kill should land mid-stage"

    assert _run(tmp_path / "killed.yaml") == 0
    for unit in (f"{i:06d}" for i in range(16)):
        assert _rows(tmp_path / "killed", "blip", unit) == _rows(tmp_path / "straight", "blip", unit)
    assert not list((tmp_path / "killed" / "captions").rglob("*.tmp"))


@pytest.mark.parametrize(
    "caption,message",
    [
        ({"backend": "blip", "model": "./no-such-model"}, "caption model not found"),
        (
            {"backend": "retrieval", "model": "ViT-B-32", "retrieval": {"bank": "missing.txt"}},
            "caption bank not found",
        ),
        (
            {"backend": "retrieval", "model": "mcip-tiny-vit", "retrieval": {"bank": "empty.txt"}},
            "caption bank is empty",
        ),
        ({"backend": "retrieval", "model": "ViT-B-32"}, "backend 'retrieval' needs a `retrieval` section"),
        (
            {"backend": "blip", "model": "x", "retrieval": {"bank": "empty.txt"}},
            "stages.caption: retrieval: not used by backend 'blip' "
            "(it uses: captions_per_image, dtype, generation, model)",
        ),
        (
            {"backend": "alt_text", "model": "x", "generation": {}},
            "generation, model: not used by backend 'alt_text'",
        ),
        (
            {"backend": "blip", "model": "x", "generation": {"decoding": "prompts"}},
            "stages.caption.generation: decoding 'prompts' needs a non-empty `prompts` list",
        ),
        (
            {"backend": "blip", "model": "x", "generation": {"beams": 3}},
            "stages.caption.generation.beams: unknown key",
        ),
        ({"backend": "alt_text", "captions": ".."}, "stages.caption.captions: string should match pattern"),
        (
            {"backend": "alt_text", "captions": "alt"},
            "captions: 'alt' is reserved for the downloaded alt text",
        ),
        ({"backend": "alt_text", "scoring": {"min_score": 0.2}}, "scoring.min_score needs CLIP scores"),
        ({"backend": "gpt"}, "stages.caption.backend: must be one of"),
        (
            {"backend": "blip", "captions_per_image": 0},
            "stages.caption.captions_per_image: must be > 0, got 0",
        ),
        ({"backend": "blip"}, "backend 'blip' needs `model`"),
        (
            {"backend": "alt_text", "device": "gpu"},
            "stages.caption.device: device must be cpu, cuda, cuda:N or mps",
        ),
        (
            {
                "backend": "retrieval",
                "model": "ViT-B-32",
                "retrieval": {"bank": "empty.txt", "pretrained": "nope"},
            },
            "caption: open_clip has no pretrained tag 'nope' for ViT-B-32",
        ),
        (
            {"backend": "alt_text", "scoring": {"model": "ViT-Nope"}},
            "caption.scoring: unknown open_clip architecture",
        ),
        ({"backend": "blip", "model": "org/not-cached"}, "cannot load caption model 'org/not-cached'"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, tiny_models, capsys, caption, message):
    make_image_shards(tmp_path / "run", shards=1, per_shard=2)
    (tmp_path / "empty.txt").write_text("\n\n")
    if caption.get("model") == "mcip-tiny-vit":
        caption["retrieval"].update(
            pretrained=str(tiny_models["clip_checkpoint"]), config_dir=str(tiny_models["clip_configs"])
        )
    manifest = write_caption_manifest(tmp_path, caption)
    assert _run(manifest) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # log lines may come first; no traceback
    assert last.startswith("error: ") and message in last
    assert not (tmp_path / "run" / "captions").exists()


def test_caption_needs_a_complete_download(tmp_path, capsys):
    make_image_shards(tmp_path / "run", shards=1, per_shard=2)
    (tmp_path / "run" / "images" / "_SUCCESS.json").unlink()
    assert _run(write_caption_manifest(tmp_path, {"backend": "alt_text"})) == 2
    assert "download stage is not complete" in capsys.readouterr().err


def test_export_is_read_by_open_clip_trainer(tmp_path, tiny_models):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    make_image_shards(tmp_path / "run", shards=3, per_shard=4, corrupt=(1,))
    manifest = write_caption_manifest(tmp_path, {"backend": "alt_text"})
    assert _run(manifest) == 0
    assert cli(["export", str(manifest), "--captions", "alt_text", "--to", str(tmp_path / "export")]) == 0
    sizes = json.loads((tmp_path / "export" / "sizes.json").read_text())
    assert sizes == {"000000.tar": 3, "000001.tar": 4, "000002.tar": 4}  # the corrupt image has no caption

    open_clip.add_model_config(str(tiny_models["clip_configs"]))
    _, _, preprocess = open_clip.create_model_and_transforms(tiny_models["clip_arch"])
    args = Namespace(
        train_data=str(tmp_path / "export" / "{000000..000002}.tar"),
        train_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=2,
        world_size=1,
        workers=1,
    )
    data = get_wds_dataset(
        args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer(tiny_models["clip_arch"])
    )
    assert data.dataloader.num_samples == 12
    images, texts = next(iter(data.dataloader))
    assert images.shape == (2, 3, 32, 32) and texts.shape == (2, 32)
    sample = next(iter_samples([tmp_path / "export" / "000001.tar"]))
    assert (
        sample["txt"] == b"alt 4"
        and json.loads(sample["json"])["captions"] == ["alt 4"]
        and sample["cls"] == b"1"
    )
