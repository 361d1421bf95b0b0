"""Tiny models with random weights, saved to a folder and loaded back through the same code paths
that load real weights on a cluster (open_clip checkpoint file, transformers `from_pretrained`).

No hub access: tokenizers are built locally from a small word list. Used by the tests, the
benchmarks and the demo.

    python -m examples.tiny_models /tmp/tiny     # writes all of them there
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TINY_CLIP = "mcip-tiny-vit"
WORDS = (
    "a an the photo picture image of with on in and red green blue yellow purple cyan square circle "
    "triangle star small large dark light background object shape colour color describe one sentence "
    "what is this"
).split()


def tiny_clip_config() -> dict:
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


SMALL_CLIP = "mcip-small-vit"


def small_clip_config() -> dict:
    """Compute-heavier than the tiny one, for benchmarks where the model, not data, should dominate."""
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 6, "width": 256, "patch_size": 8, "head_width": 64},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
    }


def save_tiny_clip(
    folder: Path, seed: int = 0, name: str = TINY_CLIP, config: dict | None = None
) -> tuple[str, Path, Path]:
    """(architecture, checkpoint file, config folder) of a random open_clip ViT (tiny by default)."""
    import open_clip

    folder = Path(folder)
    config_dir = folder / "open_clip_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / f"{name}.json").write_text(json.dumps(config or tiny_clip_config(), indent=2))
    open_clip.add_model_config(str(config_dir))
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    checkpoint = folder / f"{name}.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return name, checkpoint, config_dir


def _fast_tokenizer(words: list[str], specials: dict[str, str], **extra):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(list(specials.values()) + words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # WordLevel pieces joined with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials, **extra)


def save_tiny_blip(
    folder: Path, seed: int = 0, width: int = 32, layers: int = 2, image_size: int = 32, patch_size: int = 8
) -> Path:
    """A random BLIP; the defaults make it tiny, larger values make a compute-heavier one for benchmarks."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = BertTokenizer(
        vocab={w: i for i, w in enumerate(vocab)}
    )  # transformers 5: vocab=, not vocab_file=
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=64,
            encoder_hidden_size=width,
            bos_token_id=2,
            sep_token_id=3,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    return _save(folder, BlipForConditionalGeneration(config), processor)


def save_tiny_blip2(folder: Path, seed: int = 0) -> Path:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    specials = {"pad_token": "<pad>", "eos_token": "</s>", "bos_token": "</s>", "unk_token": "<unk>"}
    tokenizer = _fast_tokenizer(WORDS, specials)
    query_tokens = 4
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=query_tokens,
    )  # adds the <image> token
    vocab_size = len(processor.tokenizer)
    config = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=32,
            vocab_size=vocab_size,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=vocab_size,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
        ),
        num_query_tokens=query_tokens,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    return _save(folder, Blip2ForConditionalGeneration(config), processor)


LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def save_tiny_llava(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    words = ["<image>", "USER:", "ASSISTANT:", "Describe", "image", "in", "sentence."] + WORDS
    tokenizer = _fast_tokenizer(words, specials, extra_special_tokens={"image_token": "<image>"})
    tokenizer.padding_side = "left"
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(seed)
    return _save(folder, LlavaForConditionalGeneration(config), processor)


def _save(folder: Path, model, processor) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    print(save_tiny_clip(out / "clip"))
    for name, save in (("blip", save_tiny_blip), ("blip2", save_tiny_blip2), ("llava", save_tiny_llava)):
        print(save(out / name))
