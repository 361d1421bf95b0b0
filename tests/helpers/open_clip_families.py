"""Tiny random-weight models of every open_clip family, written to a folder the way real ones sit on disk.

Writes FOLDER/open_clip_configs/<arch>.json, FOLDER/<arch>.pt ({"state_dict": ...}) and, where the
family needs them, a local Hugging Face tokenizer folder and a tiny Hugging Face text model folder
(config + weights, `from_pretrained` reads them like a hub model). The configs copy the shapes of
published checkpoints (open_clip's model_configs/), only smaller:

    vit      CLIP, ViT image tower                          (ViT-B-32)
    resnet   CLIP, ModifiedResNet image tower               (RN50: vision_cfg.layers a list)
    siglip   CustomTextCLIP, timm ViT with MAP pooling, HF tokenizer, biased text projection,
             init_logit_bias, bidirectional text, last-token pooling, tanh GELU
                                                            (ViT-SO400M-14-SigLIP-384, ViT-B-16-SigLIP2)
    coca     CoCa, attentional-pool ViT, CLS text token, multimodal decoder     (coca_ViT-B-32)
    xlmr     CustomTextCLIP with an XLM-RoBERTa text tower, mean pooling, MLP projection
                                                            (xlm-roberta-base-ViT-B-32)
    bert     CustomTextCLIP with a BERT text tower, CLS pooling through BERT's pooler, linear projection

`unlocked` lists the state-dict prefixes re-alignment with `unlocked_layers: 1` may change (last text
block, what follows it, logit scale), written out by hand from open_clip's module layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

WORDS = (
    "a an the photo picture image of with on in and red green blue yellow square circle triangle "
    "star small large background object shape colour alt"
).split() + [str(n) for n in range(100)]
CONTEXT = 16
TINY_VIT = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
TINY_TEXT = {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # the open_clip class the config builds
    text_class: str
    unlocked: tuple[str, ...]  # state-dict prefixes realign (1 unlocked layer) may change
    last_block: str  # prefix of the last text block: realign must change something in it
    projection: str  # a tensor of the text projection: realign must change it
    config: Callable[[Path], dict]  # writes what the config points to under the folder, returns the config


def _tokenizer(folder: Path, specials: dict[str, str], template: str | None) -> int:
    """A word-level fast tokenizer saved with `save_pretrained`; `template` adds the special tokens
    the real tokenizer adds (e.g. "[CLS] $A [SEP]"). Returns the vocabulary size."""
    from tokenizers import processors

    from examples.tiny_models import _fast_tokenizer

    tokenizer = _fast_tokenizer(WORDS, specials)
    if template:
        names = [t for t in template.split() if t != "$A"]
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in names]
        )
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def _siglip(folder: Path) -> dict:
    tokenizer = folder / "siglip-tokenizer"
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    vocab = _tokenizer(tokenizer, specials, "$A </s>")
    # timm's test_vit3: class_token=False, MAP pooling (attention pool), like vit_so400m_patch14_siglip_384
    return {
        "embed_dim": 96,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 160,
            "timm_model_name": "test_vit3",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        "text_cfg": {
            "context_length": CONTEXT,
            "vocab_size": vocab,
            "hf_tokenizer_name": str(tokenizer),
            "tokenizer_kwargs": {"clean": "canonicalize"},
            "width": 96,
            "heads": 2,
            "layers": 2,
            "mlp_ratio": 3.7362,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
            "act_kwargs": {"approximate": "tanh"},
        },
    }


def _coca(folder: Path) -> dict:
    return {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": {**TINY_VIT, "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {**TINY_TEXT, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {
            "context_length": CONTEXT,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 1,
            "attn_pooler_heads": 2,
        },
    }


def _xlmr(folder: Path) -> dict:
    from transformers import XLMRobertaConfig, XLMRobertaModel

    hf = folder / "xlm-roberta"
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    vocab = _tokenizer(hf, specials, "<s> $A </s>")  # pad id 1, as RoBERTa's
    config = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT + 4,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(hf)  # mean pooling: no HF pooler
    return {
        "embed_dim": 32,
        "vision_cfg": TINY_VIT,
        "text_cfg": {
            "hf_model_name": str(hf),
            "hf_tokenizer_name": str(hf),
            "hf_pooler_type": "mean_pooler",
            "hf_model_pretrained": False,
            "context_length": CONTEXT,
        },
    }


def _bert(folder: Path) -> dict:
    from transformers import BertConfig, BertModel

    hf = folder / "bert"
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    vocab = _tokenizer(hf, specials, "[CLS] $A [SEP]")
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT + 4,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(hf)
    return {
        "embed_dim": 32,
        "vision_cfg": TINY_VIT,
        "text_cfg": {
            "hf_model_name": str(hf),
            "hf_tokenizer_name": str(hf),
            "hf_pooler_type": "cls_pooler",
            "hf_proj_type": "linear",
            "hf_model_pretrained": False,
            "context_length": CONTEXT,
        },
    }


TINY_RESNET = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}
_FLAT_LAST = "transformer.resblocks.1."  # the last of the 2 text blocks, by family layout
_TOWER_LAST = "text.transformer.resblocks.1."
_HF_LAST = "text.transformer.encoder.layer.1."
_FLAT_CLIP = (_FLAT_LAST, "ln_final.", "text_projection", "logit_scale")
_TOWER = (_TOWER_LAST, "text.ln_final.", "text.text_projection", "logit_scale")
FAMILIES = {
    f.name: f
    for f in (
        Family(
            "vit",
            "CLIP",
            "CLIP",
            _FLAT_CLIP,
            _FLAT_LAST,
            "text_projection",
            lambda folder: {"embed_dim": 32, "vision_cfg": TINY_VIT, "text_cfg": TINY_TEXT},
        ),
        Family(
            "resnet",
            "CLIP",
            "CLIP",
            _FLAT_CLIP,
            _FLAT_LAST,
            "text_projection",
            lambda folder: {"embed_dim": 32, "vision_cfg": TINY_RESNET, "text_cfg": TINY_TEXT},
        ),
        Family(
            "siglip",
            "CustomTextCLIP",
            "TextTransformer",
            _TOWER,
            _TOWER_LAST,
            "text.text_projection.bias",
            _siglip,
        ),
        Family("coca", "CoCa", "TextTransformer", _TOWER, _TOWER_LAST, "text.text_projection", _coca),
        Family(
            "xlmr",
            "CustomTextCLIP",
            "HFTextEncoder",
            (_HF_LAST, "text.proj.", "logit_scale"),
            _HF_LAST,
            "text.proj.0.weight",
            _xlmr,
        ),
        Family(
            "bert",
            "CustomTextCLIP",
            "HFTextEncoder",
            (_HF_LAST, "text.transformer.pooler.", "text.proj.", "logit_scale"),
            _HF_LAST,
            "text.proj.weight",
            _bert,
        ),
    )
}


def save_family(family: Family, folder: Path, seed: int = 0) -> tuple[str, Path, Path]:
    """(architecture, random checkpoint, config folder); the architecture is registered with open_clip."""
    import open_clip

    folder = Path(folder)
    config_dir = folder / "open_clip_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    arch = f"family-{family.name}"
    (config_dir / f"{arch}.json").write_text(json.dumps(family.config(folder), indent=2))
    open_clip.add_model_config(str(config_dir))
    torch.manual_seed(seed)
    model = open_clip.create_model(arch)
    assert type(model).__name__ == family.model_class, type(model).__name__
    checkpoint = folder / f"{arch}.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return arch, checkpoint, config_dir
