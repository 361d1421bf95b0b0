"""Model factory: freezing for fine-tuning and re-alignment, export loadable with strict=True."""

from __future__ import annotations

import open_clip
import torch

from stages.training.model import (
    build_model,
    export_model,
    freeze_for_finetune,
    freeze_for_realign,
    is_text_parameter,
    trainable_names,
)


def _tiny(tiny_models):
    return build_model(
        tiny_models["clip_arch"], str(tiny_models["clip_checkpoint"]), tiny_models["clip_configs"]
    )


def test_finetune_trains_the_image_tower_only(tiny_models):
    model = _tiny(tiny_models).model
    freeze_for_finetune(model)
    names = trainable_names(model)
    assert names and all(n.startswith("visual.") for n in names)
    assert not model.logit_scale.requires_grad


def test_realign_unlocks_last_text_blocks_norm_projection_and_scale(tiny_models):
    model = _tiny(tiny_models).model
    freeze_for_realign(model, unlocked_layers=1)
    names = set(trainable_names(model))
    assert "logit_scale" in names and "text_projection" in names and "ln_final.weight" in names
    assert any(n.startswith("transformer.resblocks.1.") for n in names)
    assert not any(n.startswith(("transformer.resblocks.0.", "visual.", "token_embedding")) for n in names)
    assert all(is_text_parameter(n) or n == "logit_scale" for n in names)


def test_export_loads_strictly_into_a_fresh_model_with_equal_embeddings(tmp_path, tiny_models):
    clip = _tiny(tiny_models)
    with torch.no_grad():  # make the weights differ from the checkpoint it was built from
        clip.model.visual.conv1.weight.add_(0.5)
    export_model(clip.model, tmp_path / "model.pt")
    fresh, _, _ = open_clip.create_model_and_transforms(tiny_models["clip_arch"], pretrained=None)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt")["state_dict"], strict=True)
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenizer(["a red circle", "a blue square"])
    clip.model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(images), clip.model.encode_image(images))
        assert torch.equal(fresh.encode_text(tokens), clip.model.encode_text(tokens))
