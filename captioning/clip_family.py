"""The open_clip model families, in one place: where each keeps its text tower, its last blocks,
its final norm and projection, its embedding width and its logit scale/bias.

Reads nothing from disk: it inspects an open_clip model that is already built.

    family_of(model)      a `ClipFamily` or `UnsupportedModelError` (one line naming the class)
    embed_dim(model)      width of the joint embedding
    text_blocks(model)    the text tower's transformer blocks, input side first
    text_head(model)      what follows the last block: final norm, pooler, projection (those present)
    logit_bias(model)     the learnable SigLIP bias, or None
    is_image_parameter(name) / is_text_parameter(name)   state-dict names by tower

Families (open_clip 3.x):
    CLIP            ViT or ModifiedResNet image tower; the text tower's parts live on the model itself
                    (`transformer.resblocks`, `ln_final`, `text_projection` as a matrix or a Linear)
    CustomTextCLIP  the text tower under `.text`: open_clip's TextTransformer (SigLIP/SigLIP2: biased
                    Linear projection, `logit_bias`, timm image tower) or a Hugging Face encoder
                    (`hf_model_name`: BERT, RoBERTa, XLM-R, mT5, M2M100)
    CoCa            like CustomTextCLIP; its multimodal `text_decoder` is not part of the text embedding
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from captioning.base import CaptionerError

SUPPORTED = (
    "CLIP (ViT or ModifiedResNet image tower), CustomTextCLIP (SigLIP/SigLIP2 or a Hugging Face "
    "text tower), CoCa"
)
IMAGE_PREFIX = "visual."
LOGIT_PARAMETERS = ("logit_scale", "logit_bias")
HF_BLOCK_LISTS = ("layer", "block", "layers")  # BERT/RoBERTa/XLM-R encoder.layer, T5 block, M2M100 layers
HF_FINAL_NORMS = ("final_layer_norm", "layer_norm")  # pre-norm encoders only; BERT-like ones end in a block


class UnsupportedModelError(CaptionerError):
    """A model class (or text tower) this project does not know how to fine-tune or realign."""


@dataclass(frozen=True)
class ClipFamily:
    name: str  # "clip" | "custom_text" | "coca"
    text_kind: str  # "open_clip" | "hf:<model_type>"
    text_tower: nn.Module  # the module whose forward embeds text (the model itself for CLIP)
    blocks: nn.ModuleList
    head: tuple  # modules or bare parameters after the last block, in forward order
    embed_dim: int


def family_of(model) -> ClipFamily:
    import open_clip

    if isinstance(model, open_clip.CLIP):
        return _flat_clip(model)
    if isinstance(model, (open_clip.CustomTextCLIP, open_clip.CoCa)):
        return _tower_family("coca" if isinstance(model, open_clip.CoCa) else "custom_text", model)
    raise UnsupportedModelError(f"unsupported model class {type(model).__name__}; supported: {SUPPORTED}")


def _flat_clip(model) -> ClipFamily:
    """CLIP copies its text tower's parts onto itself (no `.text`)."""
    width = _projected_width(model.text_projection, model.transformer.width)
    return ClipFamily(
        "clip",
        "open_clip",
        model,
        model.transformer.resblocks,
        _present(model.ln_final, model.text_projection),
        width,
    )


def _tower_family(name: str, model) -> ClipFamily:
    from open_clip.hf_model import HFTextEncoder
    from open_clip.transformer import TextTransformer

    text = model.text
    if isinstance(text, TextTransformer):
        width = _projected_width(text.text_projection, text.width)
        return ClipFamily(
            name,
            "open_clip",
            text,
            text.transformer.resblocks,
            _present(text.ln_final, text.text_projection),
            width,
        )
    if isinstance(text, HFTextEncoder):
        blocks, head = _hf_parts(text)
        return ClipFamily(name, f"hf:{text.config.model_type}", text, blocks, head, text.output_dim)
    raise UnsupportedModelError(
        f"unsupported text tower {type(text).__name__} in {type(model).__name__}; supported: {SUPPORTED}"
    )


def _hf_parts(text) -> tuple[nn.ModuleList, tuple]:
    """open_clip keeps the encoder in `.transformer` (an encoder-decoder is cut to its encoder) and
    adds its own pooler (parameter-free, except BERT's own `pooler` that cls pooling uses) and `proj`."""
    encoder = getattr(text.transformer, "encoder", text.transformer)
    lists = [getattr(encoder, n, None) for n in HF_BLOCK_LISTS]
    blocks = next((b for b in lists if isinstance(b, nn.ModuleList)), None)
    if blocks is None:
        raise UnsupportedModelError(
            f"unsupported Hugging Face text tower {type(text.transformer).__name__}: "
            f"no block list ({', '.join(HF_BLOCK_LISTS)}); supported: {SUPPORTED}"
        )
    norm = next((getattr(encoder, n) for n in HF_FINAL_NORMS if getattr(encoder, n, None) is not None), None)
    return blocks, _present(norm, getattr(text.transformer, "pooler", None), text.proj)


def _present(*parts) -> tuple:
    return tuple(p for p in parts if p is not None)


def _projected_width(projection, width: int) -> int:
    """A matrix [width, D], a Linear(width, D), or None (`proj_type: none`: the tower's own width)."""
    if projection is None:
        return width
    return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[-1]


def embed_dim(model) -> int:
    return family_of(model).embed_dim


def text_blocks(model) -> nn.ModuleList:
    return family_of(model).blocks


def text_head(model) -> tuple:
    return family_of(model).head


def logit_bias(model) -> torch.nn.Parameter | None:
    """SigLIP models have one (`init_logit_bias` in the config); CLIP-trained ones have none."""
    return getattr(model, "logit_bias", None)


def is_image_parameter(name: str) -> bool:
    """Every family keeps its whole image tower (timm trunk, ViT, ResNet, pooling, projection) in `visual`."""
    return name.startswith(IMAGE_PREFIX)


def is_text_parameter(name: str) -> bool:
    """Everything outside the image tower and the logit scale/bias belongs to the text side (for
    CoCa that includes its multimodal text decoder)."""
    return not is_image_parameter(name) and name not in LOGIT_PARAMETERS
