"""open_clip models for training: build, freeze, export.

Build from an architecture plus a pretrained tag, a local checkpoint file or an `hf-hub:` name;
tiny architectures for tests come from a folder of JSON configs (`config_dir`). What "image tower",
"last text blocks" and "projection" mean for each open_clip family (CLIP, SigLIP-style CustomTextCLIP,
Hugging Face text towers, CoCa) is in captioning/clip_family.py. The export is
`{"state_dict": ...}` in a file that loads the way the README promises:

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.load_state_dict(torch.load(path)["state_dict"], strict=True)
"""

from __future__ import annotations

from pathlib import Path

import torch

from captioning.base import CaptionerError
from captioning.clip_family import (  # is_text_parameter: re-exported for the stages and tests
    embed_dim,
    family_of,
    is_image_parameter,
    is_text_parameter,  # noqa: F401
    logit_bias,
)
from captioning.clip_models import ClipModel, load_clip
from shards.atomic import atomic_write
from stages.errors import StageConfigError


def build_model(
    arch: str, pretrained: str | None = None, config_dir: Path | None = None, device: str = "cpu"
) -> ClipModel:
    """The open_clip model in train mode, with its transforms and tokenizer. A model that cannot be
    loaded, or whose family (captioning/clip_family.py) is not supported, is a one-line error."""
    try:
        clip = load_clip(arch, pretrained, config_dir, device)
        family_of(clip.model)  # fail before any data work, not at the first freeze
    except CaptionerError as err:
        raise StageConfigError(str(err)) from None
    clip.model.train()
    return clip


def freeze_for_finetune(model) -> None:
    """MCIP / GPR-FT: train the image tower (with its projection); freeze the text tower and logit scale."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_image_parameter(name))


def freeze_for_realign(model, unlocked_layers: int = 1, train_logit_bias: bool = False) -> None:
    """Re-alignment: train the last `unlocked_layers` text blocks, what follows them (final norm, pooler,
    projection: whichever the family has) and the logit scale, plus the logit bias for the sigmoid
    loss; freeze everything else (the whole image tower included)."""
    family = family_of(model)
    blocks = family.blocks
    if not 0 <= unlocked_layers <= len(blocks):
        raise StageConfigError(
            f"realign: unlocked_layers must be in [0, {len(blocks)}] for this "
            f"{type(model).__name__}, got {unlocked_layers}"
        )
    model.requires_grad_(False)
    for part in (*blocks[len(blocks) - unlocked_layers :], *family.head):  # modules or bare parameters
        part.requires_grad_(True)
    model.logit_scale.requires_grad_(True)
    if train_logit_bias:
        require_logit_bias(model).requires_grad_(True)


def require_logit_bias(model) -> torch.nn.Parameter:
    """The learnable bias of the sigmoid loss; CLIP-trained models have none."""
    bias = logit_bias(model)
    if bias is None:
        raise StageConfigError(
            f"realign: loss 'siglip' needs a model with a logit_bias (SigLIP's "
            f"init_logit_bias); this {type(model).__name__} has none; use loss: infonce"
        )
    return bias


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
        width = embed_dim(clip_model)
        self.proxies = torch.nn.Parameter(torch.nn.init.xavier_uniform_(torch.empty(classes, width)))
