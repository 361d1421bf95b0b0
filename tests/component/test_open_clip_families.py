"""Every open_clip model family through the real stages, via the CLI, on tiny random models and shards.

Families (tests/helpers/open_clip_families.py): CLIP with a ViT and with a ModifiedResNet image tower,
SigLIP-style CustomTextCLIP (timm image tower, HF tokenizer, logit bias, biased projection), CoCa,
and CustomTextCLIP with an XLM-RoBERTa or BERT text tower. For each: finetune (mcip) trains only
`visual.*`; realign (InfoNCE) trains only the last text block, what follows it and the logit scale;
the exported models strict-load into `open_clip.create_model_and_transforms(arch, pretrained=None)`;
evaluate's `load_clip` embeds images and texts. Plus: gpr finetune and sigmoid-loss realign on
SigLIP, the sigmoid loss refused on a model without logit_bias, and an unsupported model class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from captioning.clip_family import UnsupportedModelError, family_of
from captioning.clip_models import load_clip
from examples.image_server import generated_jpeg
from pipeline.cli import main as cli
from tests.conftest import make_image_shards
from tests.helpers.open_clip_families import FAMILIES, Family, save_family


@dataclass(frozen=True)
class FamilyRun:
    """One family's model files and run root after caption -> finetune -> realign."""

    family: Family
    arch: str
    checkpoint: Path
    config_dir: Path
    folder: Path

    @property
    def root(self) -> Path:
        return self.folder / "run"

    def state(self, stage: str, name: str = "mcip") -> dict[str, torch.Tensor]:
        path = self.checkpoint if stage == "start" else self.root / stage / name / "final" / "model.pt"
        return torch.load(path)["state_dict"]

    def manifest(self, name: str, finetune: dict | None = None, realign: dict | None = None) -> Path:
        model = {"model": self.arch, "pretrained": str(self.checkpoint), "config_dir": str(self.config_dir)}
        stages = {
            "caption": {"backend": "alt_text", "num_workers": 0},
            "finetune": {
                **model,
                "captions": "alt_text",
                "batch_size": 4,
                "epochs": 1,
                "lr": 1e-3,
                "num_workers": 0,
                **(finetune or {}),
            },
            "realign": {"batch_size": 4, "max_steps": 2, "lr": 2e-3, "num_workers": 0, **(realign or {})},
        }
        path = self.folder / name
        path.write_text(yaml.safe_dump({"run": {"root": "run", "seed": 0}, "stages": stages}))
        return path


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    """`family_run(name)`: the family's model saved and run through caption, finetune and realign once
    per module (8 images, batch 4: 2 finetune steps, 2 realign steps)."""
    runs: dict[str, FamilyRun] = {}

    def get(name: str) -> FamilyRun:
        if name not in runs:
            folder = tmp_path_factory.mktemp(name)
            run = FamilyRun(FAMILIES[name], *save_family(FAMILIES[name], folder / "model"), folder)
            make_image_shards(run.root, shards=1, per_shard=8)
            (run.root / "images" / "labels.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
            assert cli(["run", str(run.manifest("m.yaml"))]) == 0
            runs[name] = run
        return runs[name]

    return get


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    assert a.keys() == b.keys()
    return {name for name in a if not _same(a[name], b[name])}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, a NaN equal to a NaN in the same place: open_clip leaves CoCa's
    `text_decoder.text_projection` as torch.empty (its init is commented out), which can hold NaN."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_finetune_trains_only_the_image_tower(family_run, name):
    run = family_run(name)
    changed = _changed(run.state("start"), run.state("finetune"))
    assert changed and all(n.startswith("visual.") for n in changed), sorted(changed)[:5]
    metrics = [json.loads(line) for line in (run.root / "finetune" / "mcip" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2] and "multi_caption" in metrics[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_realign_trains_only_the_unlocked_text_part(family_run, name):
    run = family_run(name)
    changed = _changed(run.state("finetune"), run.state("realign"))
    outside = sorted(n for n in changed if not n.startswith(run.family.unlocked))
    assert not outside, outside[:5]
    assert any(n.startswith(run.family.last_block) for n in changed)
    assert run.family.projection in changed and "logit_scale" in changed
    assert "logit_bias" not in changed  # InfoNCE does not use it


@pytest.mark.parametrize("name", list(FAMILIES))
def test_exported_models_strict_load_as_the_readme_promises(family_run, name):
    run = family_run(name)
    model, _, preprocess = open_clip.create_model_and_transforms(run.arch, pretrained=None)
    assert type(model).__name__ == run.family.model_class
    assert type(getattr(model, "text", model)).__name__ == run.family.text_class
    for stage in ("finetune", "realign"):
        model.load_state_dict(run.state(stage), strict=True)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_evaluate_embeds_images_and_texts(family_run, name):
    from io import BytesIO

    from PIL import Image

    run = family_run(name)
    clip = load_clip(run.arch, run.root / "realign" / "mcip" / "final" / "model.pt", run.config_dir)
    width = family_of(clip.model).embed_dim
    pictures = [Image.open(BytesIO(generated_jpeg(n))).convert("RGB") for n in range(2)]
    pixels = torch.stack([clip.preprocess(p) for p in pictures])
    images, texts = clip.encode_images(pixels), clip.encode_texts(["alt 1", "a red circle"])
    assert images.shape == (2, width) and texts.shape == (2, width)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2)) and abs(texts[0] @ texts[0] - 1) < 1e-5
    assert clip.encode_texts([]).shape == (0, width)


def test_gpr_finetune_on_siglip(family_run):
    run = family_run("siglip")
    manifest = run.manifest("gpr.yaml", finetune={"name": "gpr", "loss": "gpr"})
    assert cli(["run", str(manifest), "--stage", "finetune"]) == 0
    changed = _changed(run.state("start"), run.state("finetune", "gpr"))
    assert changed and all(n.startswith("visual.") for n in changed)
    metrics = [json.loads(line) for line in (run.root / "finetune" / "gpr" / "metrics.jsonl").open()]
    assert "multi_caption" not in metrics[0] and "arc_margin" in metrics[0]


def test_sigmoid_loss_realign_on_siglip_trains_the_logit_bias_too(family_run):
    run = family_run("siglip")
    manifest = run.manifest("sig.yaml", realign={"name": "sig", "source": "mcip", "loss": "siglip"})
    assert cli(["run", str(manifest), "--stage", "realign"]) == 0
    changed = _changed(run.state("finetune"), run.state("realign", "sig"))
    outside = sorted(n for n in changed if not n.startswith((*run.family.unlocked, "logit_bias")))
    assert not outside, outside[:5]
    assert {"logit_bias", "logit_scale", run.family.projection} <= changed
    metrics = [json.loads(line) for line in (run.root / "realign" / "sig" / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2] and "logit_bias" in metrics[0]


def test_sigmoid_loss_on_a_model_without_logit_bias_is_a_clear_error(family_run, capsys):
    run = family_run("vit")
    manifest = run.manifest("sig.yaml", realign={"name": "sig", "source": "mcip", "loss": "siglip"})
    capsys.readouterr()
    assert cli(["run", str(manifest), "--stage", "realign"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: realign: loss 'siglip' needs a model with a logit_bias") and "CLIP" in last
    assert not (run.root / "embeddings" / "sig").exists()  # refused before any work


def test_an_unsupported_model_class_is_one_clear_error(family_run):
    not_a_clip = open_clip.create_model(family_run("vit").arch).visual  # a real open_clip module, no CLIP
    with pytest.raises(UnsupportedModelError) as caught:
        family_of(not_a_clip)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in message
    assert "VisionTransformer" in message and all(f in message for f in ("CLIP", "CustomTextCLIP", "CoCa"))
