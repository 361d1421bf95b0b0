"""open_clip models for training: build, freeze, export.

Build from an architecture plus a pretrained tag, a local checkpoint file or an `hf-hub:` name;
tiny architectures for tests come from a folder of JSON configs (`config_dir`). The export is
`{"state_dict": ...}` in a file that loads the way the README promises:

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.load_state_dict(torch.load(path)["state_dict"], strict=True)
"""
from __future__ import annotations

from pathlib import Path

import torch

from captioning.clip_models import ClipModel, load_clip
from shards.atomic import atomic_write

LOGIT_PARAMETERS = ("logit_scale", "logit_bias")


def build_model(arch: str, pretrained: str | None = None, config_dir: Path | None = None,
                device: str = "cpu") -> ClipModel:
    """The open_clip model in train mode, with its transforms and tokenizer."""
    clip = load_clip(arch, pretrained, config_dir, device)
    clip.model.train()
    return clip


def is_text_parameter(name: str) -> bool:
    """Everything outside the image tower and the logit scale/bias belongs to the text tower."""
    return not name.startswith("visual.") and name not in LOGIT_PARAMETERS


def _text_blocks(model) -> torch.nn.ModuleList:
    tower = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower under .text
    return tower.transformer.resblocks


def freeze_for_finetune(model) -> None:
    """MCIP / GPR-FT: train the image tower (with its projection); freeze the text tower and logit scale."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("visual."))


def freeze_for_realign(model, unlocked_layers: int = 1) -> None:
    """Re-alignment: train the last `unlocked_layers` text blocks, the final norm, the text projection
    and the logit scale; freeze everything else (the whole image tower included)."""
    blocks = _text_blocks(model)
    if not 0 <= unlocked_layers <= len(blocks):
        raise ValueError(f"unlocked_layers must be in [0, {len(blocks)}], got {unlocked_layers}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    unlocked = [blocks[i] for i in range(len(blocks) - unlocked_layers, len(blocks))]
    for module in unlocked:
        module.requires_grad_(True)
    tower = getattr(model, "text", model)
    for name in ("ln_final", "text_projection"):  # a module (norm, linear) or a bare parameter
        part = getattr(tower, name, None)
        if part is not None:
            part.requires_grad_(True)
    model.logit_scale.requires_grad_(True)


def trainable_names(model) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def export_model(model, path: Path) -> None:
    """Write `{"state_dict": ...}` atomically (temporary name, fsync, rename)."""
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    with atomic_write(Path(path)) as handle:
        torch.save({"state_dict": state}, handle)


class WithProxies(torch.nn.Module):
    """The CLIP model plus learnable class proxies (Xavier-uniform), so one engine owns everything
    that trains; the export holds only the CLIP model."""

    def __init__(self, clip_model, classes: int) -> None:
        super().__init__()
        self.clip = clip_model
        width = clip_model.text_projection.shape[1] if isinstance(clip_model.text_projection, torch.Tensor) \
            else clip_model.text_projection.out_features
        self.proxies = torch.nn.Parameter(torch.nn.init.xavier_uniform_(torch.empty(classes, width)))
