"""finetune and realign with a tiny open_clip model: what trains, what stays frozen, exact resume,
and 2 processes under DeepSpeed ZeRO-2 (gloo) through torchrun (one agent and two:
tests/component/test_elastic.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from pipeline.cli import main as cli
from tests.conftest import REPO, cli_env, make_image_shards


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path)["state_dict"]


def _manifest(
    folder: Path,
    tiny_models: dict,
    finetune: dict | None = None,
    realign: dict | None = None,
    root: str = "run",
    name: str = "m.yaml",
) -> Path:
    stages = {
        "caption": {"backend": "alt_text", "num_workers": 0},
        "finetune": {
            "model": tiny_models["clip_arch"],
            "pretrained": str(tiny_models["clip_checkpoint"]),
            "config_dir": str(tiny_models["clip_configs"]),
            "captions": "alt_text",
            "batch_size": 4,
            "epochs": 2,
            "lr": 1e-3,
            "checkpoint_every": 3,
            "num_workers": 0,
            **(finetune or {}),
        },
        "realign": {
            "batch_size": 4,
            "max_steps": 6,
            "lr": 2e-3,
            "checkpoint_every": 3,
            "num_workers": 0,
            **(realign or {}),
        },
    }
    path = folder / name
    path.write_text(yaml.safe_dump({"run": {"root": root, "seed": 0}, "stages": stages}))
    return path


def _images(root: Path, shards: int = 3, per_shard: int = 8) -> None:
    make_image_shards(root, shards=shards, per_shard=per_shard)
    (root / "images" / "labels.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))


@pytest.mark.parametrize("loss", ["mcip", "gpr"])
def test_finetune_trains_only_the_image_tower_then_realign_only_text_layers(tmp_path, tiny_models, loss):
    _images(tmp_path / "run")
    manifest = _manifest(tmp_path, tiny_models, finetune={"loss": loss})
    assert cli(["run", str(manifest)]) == 0
    pretrained = _state(tiny_models["clip_checkpoint"])
    finetuned = _state(tmp_path / "run" / "finetune" / "mcip" / "final" / "model.pt")
    realigned = _state(tmp_path / "run" / "realign" / "mcip" / "final" / "model.pt")
    for name, tensor in finetuned.items():
        if not name.startswith("visual."):
            assert torch.equal(tensor, pretrained[name]), f"finetune changed {name}"
    assert not torch.equal(finetuned["visual.conv1.weight"], pretrained["visual.conv1.weight"])
    for name, tensor in realigned.items():
        if name.startswith(
            ("visual.", "transformer.resblocks.0.", "token_embedding", "positional_embedding")
        ):
            assert torch.equal(tensor, finetuned[name]), f"realign changed {name}"
    assert not torch.equal(
        realigned["transformer.resblocks.1.attn.in_proj_weight"],
        finetuned["transformer.resblocks.1.attn.in_proj_weight"],
    )
    metrics = [json.loads(line) for line in (tmp_path / "run" / "finetune" / "mcip" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == list(range(1, 13)) and all(m["loss"] == m["loss"] for m in metrics)
    assert (loss == "mcip") == ("multi_caption" in metrics[0])
    model, _, _ = open_clip.create_model_and_transforms(tiny_models["clip_arch"], pretrained=None)
    model.load_state_dict(realigned, strict=True)  # the usage the README promises


def _kill_when(path_glob: str, folder: Path, process: subprocess.Popen, sig: int) -> None:
    deadline = time.monotonic() + 300
    while not list(folder.glob(path_glob)) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.killpg(process.pid, sig)
    process.wait(timeout=300)


@pytest.mark.parametrize("sig", [signal.SIGUSR1])  # SIGKILL: tests/integration/test_kill_resume.py
def test_interrupted_finetune_resumes_to_identical_parameters(tmp_path, tiny_models, sig):
    settings = {"epochs": 10, "checkpoint_every": 4, "num_workers": 1}  # the signal reaches the worker too
    for root in ("straight", "interrupted"):
        _images(tmp_path / root)
        _manifest(tmp_path, tiny_models, finetune=settings, root=root, name=f"{root}.yaml")
    for stage in ("caption", "finetune"):
        assert cli(["run", str(tmp_path / "straight.yaml"), "--stage", stage]) == 0

    out = tmp_path / "interrupted" / "finetune" / "mcip"
    assert cli(["run", str(tmp_path / "interrupted.yaml"), "--stage", "caption"]) == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.finetune", str(tmp_path / "interrupted.yaml")],
        cwd=tmp_path,
        env=cli_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _kill_when("ckpt/step-*/meta.json", out, process, sig)
    if sig == signal.SIGUSR1:
        assert process.returncode == 0  # checkpointed and stopped cleanly
    assert not (out / "final").exists(), "the interruption should land mid-training"
    metas = [json.loads(p.read_text()) for p in out.glob("ckpt/step-*/meta.json")]
    assert metas and all(m["step"] < 60 for m in metas)

    assert cli(["run", str(tmp_path / "interrupted.yaml"), "--stage", "finetune"]) == 0
    straight = _state(tmp_path / "straight" / "finetune" / "mcip" / "final" / "model.pt")
    resumed = _state(out / "final" / "model.pt")
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    done = json.loads((out / "_done" / "final.json").read_text())
    assert done["counts"] == {"steps": 60, "samples_seen": 240}  # 24 images / batch 4 x 10 epochs
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]  # the steps after the
    assert [m["step"] for m in metrics] == list(range(1, 61))  # checkpoint were trained again: once
    assert not list(out.glob("ckpt/.partial-*"))


def test_deepspeed_resume_after_sigusr1_equals_straight_run(tmp_path, tiny_models):
    """Also: rank 1 alone cannot load the newest checkpoint (its ZeRO file is damaged); both ranks
    agree to resume from the one before, and still end where the straight run ends."""
    zero2 = str(REPO / "launch" / "deepspeed" / "zero2.json")
    settings = {"deepspeed": zero2, "epochs": 6, "checkpoint_every": 2, "loss": "gpr"}
    for root in ("straight", "interrupted"):
        _images(tmp_path / root, shards=4, per_shard=8)
        _manifest(tmp_path, tiny_models, finetune=settings, root=root, name=f"{root}.yaml")
        assert cli(["run", str(tmp_path / f"{root}.yaml"), "--stage", "caption"]) == 0

    def launch(root: str, log=subprocess.DEVNULL) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                "29644",
                "-m",
                "stages.finetune",
                str(tmp_path / f"{root}.yaml"),
            ],
            cwd=tmp_path,
            env=cli_env(),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )

    assert launch("straight").wait(timeout=900) == 0
    out = tmp_path / "interrupted" / "finetune" / "mcip"
    process = launch("interrupted")
    _kill_when("ckpt/step-00000004/meta.json", out, process, signal.SIGUSR1)  # then 2 checkpoints exist
    assert not (out / "final").exists(), "the signal should land mid-training"
    *_, previous, newest = sorted(out.glob("ckpt/step-*"))
    (zero_file,) = newest.glob("pytorch_model/*zero_pp_rank_1_*optim_states.pt")
    data = zero_file.read_bytes()  # the same size: only loading it finds the damage, on rank 1 alone
    zero_file.write_bytes(data[:-1024] + bytes(1024))
    with open(tmp_path / "resume.log", "w") as log:
        assert launch("interrupted", log).wait(timeout=900) == 0
    lines = (tmp_path / "resume.log").read_text().splitlines()
    warned = [line for line in lines if "WARNING" in line and f"checkpoint {newest} cannot be used" in line]
    assert len(warned) == 1 and "on rank 1" in warned[0], lines[-20:]
    assert sum(f"resumed from {previous} " in line for line in lines) == 2, lines[-20:]  # both ranks
    straight = _state(tmp_path / "straight" / "finetune" / "mcip" / "final" / "model.pt")
    resumed = _state(out / "final" / "model.pt")
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == list(range(1, 25))  # 32 images / (4 x 2) x 6 epochs


def test_finetune_without_labels_is_a_clear_error(tmp_path, tiny_models, capsys):
    make_image_shards(tmp_path / "run", shards=1, per_shard=8)  # no labels.json: download had no label_col
    manifest = _manifest(tmp_path, tiny_models)
    assert cli(["run", str(manifest), "--stage", "caption"]) == 0
    assert cli(["run", str(manifest), "--stage", "finetune"]) == 2
    assert "finetune needs class labels" in capsys.readouterr().err.splitlines()[-1]


def test_plain_torch_on_several_processes_is_refused(tmp_path, tiny_models, capsys, monkeypatch):
    """Without DeepSpeed every process would train alone and write the same checkpoints."""
    _images(tmp_path / "run", shards=1, per_shard=8)
    manifest = _manifest(tmp_path, tiny_models)
    assert cli(["run", str(manifest), "--stage", "caption"]) == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli(["run", str(manifest), "--stage", "finetune"]) == 2
    assert "set deepspeed: to train on 2 processes" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "run" / "finetune" / "mcip" / "ckpt").exists()


def test_tensorboard_scalars_beside_metrics_when_installed(tmp_path, tiny_models):
    pytest.importorskip("tensorboard", reason="the optional `tensorboard` extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _images(tmp_path / "run", shards=1)
    assert cli(["run", str(_manifest(tmp_path, tiny_models, finetune={"epochs": 1}))]) == 0
    for stage in ("finetune", "realign"):
        out = tmp_path / "run" / stage / "mcip"
        rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        want = {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_second"}
        assert want | {f"train/{k}" for k in rows[0] if k not in ("step", "seconds")} <= tags
        losses = events.Scalars("train/loss")
        assert [e.step for e in losses] == [r["step"] for r in rows]
        assert [e.value for e in losses] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
        assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))


def test_one_process_without_torchrun_trains_both_stages_under_deepspeed(tmp_path, tiny_models):
    """What the demo does: finetune then realign in one `run`, DeepSpeed ZeRO-2, no torchrun."""
    _images(tmp_path / "run")
    zero2 = str(REPO / "launch" / "deepspeed" / "zero2.json")
    manifest = _manifest(
        tmp_path,
        tiny_models,
        finetune={"deepspeed": zero2, "epochs": 1},
        realign={"deepspeed": zero2, "max_steps": 2},
    )
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(manifest)],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("finetune", "realign"):  # DeepSpeed's own checkpoint layout, not plain torch's
        assert list((tmp_path / "run" / stage / "mcip" / "ckpt").glob("step-*/pytorch_model/*")), stage
    finetuned = _state(tmp_path / "run" / "finetune" / "mcip" / "final" / "model.pt")
    realigned = _state(tmp_path / "run" / "realign" / "mcip" / "final" / "model.pt")
    assert torch.equal(realigned["visual.conv1.weight"], finetuned["visual.conv1.weight"])
    assert not torch.equal(realigned["text_projection"], finetuned["text_projection"])


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_realign_clamps_the_logit_scale_no_lower_than_the_loaded_one(tiny_models, loss):
    """ln 100 is the ceiling unless the loaded model's own scale is higher: that one is kept."""
    from stages.training.model import build_model
    from stages.training.realigning import _loss, logit_scale_ceiling

    clip = build_model(
        tiny_models["clip_arch"], str(tiny_models["clip_checkpoint"]), str(tiny_models["clip_configs"]), "cpu"
    )
    model = clip.model
    if loss == "siglip":
        model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    tokens = clip.tokenizer(["alt 0", "alt 1"])
    with torch.no_grad():
        batch = {"tokens": tokens, "emb": torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)}

    def scale_at_step(loaded: float, now: float) -> float:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(loaded))
        ceiling = logit_scale_ceiling(model)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(now))  # where training took it
        return float(_loss(model, batch, "cpu", loss, ceiling)[1]["logit_scale"])

    assert scale_at_step(200, 200) == pytest.approx(200, rel=1e-5)  # kept, not cut to 100 at step 1
    assert scale_at_step(200, 300) == pytest.approx(200, rel=1e-5)
    assert scale_at_step(50, 150) == pytest.approx(100, rel=1e-5)  # METHOD.md's ln 100
    assert scale_at_step(50, 70) == pytest.approx(70, rel=1e-5)
