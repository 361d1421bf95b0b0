"""Tiny random-weight vision-language models of every family the generative captioners support, built
from their transformers config classes with their real processors, saved to a folder and loaded back by
the caption stage through `from_pretrained` (no hub access).

Tokenizers are word-level over a small vocabulary; every marker a processor or chat template writes
without spaces around it (image tokens, tile markers, turn markers) is an added token, so it is split
out the way the published tokenizers split it. BLIP, BLIP-2 and LLaVA-1.5 come from examples/tiny_models.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from examples.tiny_models import WORDS, save_tiny_blip, save_tiny_blip2, save_tiny_llava
from tests.conftest import FAKE_MARKER

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHAT_WORDS = ["user", "assistant", "User:", "Assistant:", "USER:", "ASSISTANT:", "Describe", "sentence."]
# the llava-1.5 style template, with a system-free user turn; used where the family has no fixed one
USER_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)
IDEFICS_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def tokenizer(added: list[str], named: dict[str, str] | None = None, specials: dict | None = None):
    """Word-level fast tokenizer; `added` tokens split out of running text, `named` ones also become
    attributes (`tokenizer.image_token`), as the processors expect."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = specials or SPECIALS
    vocab = {w: i for i, w in enumerate(dict.fromkeys(list(specials.values()) + CHAT_WORDS + WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **specials, extra_special_tokens=named or {})
    tok.add_tokens([t for t in added if t not in tok.get_vocab()], special_tokens=True)
    tok.padding_side = "left"  # batched decoder-only generation, as the model cards do
    return tok


def _llama(vocab_size: int, **extra) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )


def _clip_vision(image_size: int = 32, patch_size: int = 8) -> dict:
    return dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def _siglip_vision(image_size: int = 32, patch_size: int = 8) -> dict:
    return dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )


def _save(folder: Path, model, processor) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# pinpoints up to 64 px: a 64 x 64 picture gets a 2 x 2 grid of 32 px tiles plus the base image (5)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def save_tiny_llava_next(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = tokenizer(["<image>"], {"image_token": "<image>"})
    config = LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=_llama(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=USER_TEMPLATE,
        num_additional_image_tokens=1,
    )
    torch.manual_seed(seed)
    return _save(folder, LlavaNextForConditionalGeneration(config), processor)


def save_tiny_llava_onevision(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tok = tokenizer(["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"})
    config = LlavaOnevisionConfig(
        vision_config=_siglip_vision(),
        text_config=_llama(len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
        ),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
        tokenizer=tok,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=USER_TEMPLATE,
    )
    torch.manual_seed(seed)
    return _save(folder, LlavaOnevisionForConditionalGeneration(config), processor)


QWEN_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _save_tiny_qwen(folder: Path, seed: int, version: str) -> Path:
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = tokenizer(QWEN_TOKENS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2)
    if version == "2.5":
        vision = dict(
            depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
            spatial_merge_size=2, window_size=32, fullatt_block_indexes=[1],
        )  # fmt: skip
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},  # sums to head_dim / 2
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=0,
    )
    name = "Qwen2_5_VL" if version == "2.5" else "Qwen2VL"
    config = getattr(transformers, f"{name}Config")(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    budget = {"min_pixels": 16 * 16, "max_pixels": 64 * 64, "patch_size": 8, "merge_size": 2}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**budget),
        video_processor=Qwen2VLVideoProcessor(**budget),
        tokenizer=tok,
        chat_template=QWEN_TEMPLATE,
    )
    torch.manual_seed(seed)
    return _save(folder, getattr(transformers, f"{name}ForConditionalGeneration")(config), processor)


def save_tiny_qwen2_vl(folder: Path, seed: int = 0) -> Path:
    return _save_tiny_qwen(folder, seed, "2")


def save_tiny_qwen2_5_vl(folder: Path, seed: int = 0) -> Path:
    return _save_tiny_qwen(folder, seed, "2.5")


def _idefics_tokens(rows: int = 4) -> list[str]:
    grid = [f"<row_{r}_col_{c}>" for r in range(1, rows + 1) for c in range(1, rows + 1)]
    return [
        "<|im_start|>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
        "<end_of_utterance>",
        *grid,
    ]


def save_tiny_idefics3(folder: Path, seed: int = 0, smolvlm: bool = False) -> Path:
    import transformers

    name = "SmolVLM" if smolvlm else "Idefics3"
    tok = tokenizer(
        _idefics_tokens(),
        {
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },  # fmt: skip
    )
    config = getattr(transformers, f"{name}Config")(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),  # fmt: skip
        text_config=_llama(len(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=0,
    )
    # pictures are split into 32 px tiles (longest side up to 64 px) plus one global tile
    sizes = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}}
    parts = {
        "image_processor": getattr(transformers, f"{name}ImageProcessor")(**sizes),
        "tokenizer": tok,
        "image_seq_len": 4,  # (32 / 8)^2 patches / scale_factor^2
        "chat_template": IDEFICS_TEMPLATE,
    }
    if smolvlm:
        parts["video_processor"] = transformers.SmolVLMVideoProcessor(**sizes)
    processor = getattr(transformers, f"{name}Processor")(**parts)
    torch.manual_seed(seed)
    return _save(folder, getattr(transformers, f"{name}ForConditionalGeneration")(config), processor)


def save_tiny_smolvlm(folder: Path, seed: int = 0) -> Path:
    return save_tiny_idefics3(folder, seed, smolvlm=True)


def save_tiny_paligemma(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tok = tokenizer(["<image>"], {"image_token": "<image>"})
    tok.add_tokens(["caption", "en"])  # PaliGemma's task prefix, plain words
    processor = PaliGemmaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16),
        tokenizer=tok,
    )  # adds its <loc....>/<seg...> tokens to the tokenizer
    config = PaliGemmaConfig(
        vision_config=_siglip_vision() | {"projection_dim": 32},
        text_config=dict(
            model_type="gemma",
            vocab_size=len(processor.tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    return _save(folder, PaliGemmaForConditionalGeneration(config), processor)


def save_tiny_florence2(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    tok = tokenizer(["<image>"], {"image_token": "<image>"}, SPECIALS | {"bos_token": "<s>"})
    tok.add_tokens("with paragraph shown Describe".split())
    processor = Florence2Processor(
        image_processor=CLIPImageProcessor(
            size={"height": 32, "width": 32},
            crop_size={"height": 32, "width": 32},
            do_center_crop=False,
            image_seq_length=17,
        ),  # fmt: skip
        tokenizer=tok,
    )
    config = Florence2Config(
        vision_config=dict(
            depths=[1, 1],
            patch_size=[7, 3],
            patch_stride=[4, 2],
            patch_padding=[3, 1],
            patch_prenorm=[False, True],
            embed_dim=[16, 32],
            num_heads=[2, 2],
            num_groups=[2, 2],
            window_size=2,
            projection_dim=32,
            drop_path_rate=0.0,
        ),  # fmt: skip
        text_config=dict(
            vocab_size=len(tok),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            decoder_start_token_id=2,
        ),  # fmt: skip
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    return _save(folder, Florence2ForConditionalGeneration(config), processor)


BUILDERS = {
    "blip": save_tiny_blip,
    "blip-2": save_tiny_blip2,
    "llava": save_tiny_llava,
    "llava_next": save_tiny_llava_next,
    "llava_onevision": save_tiny_llava_onevision,
    "qwen2_vl": save_tiny_qwen2_vl,
    "qwen2_5_vl": save_tiny_qwen2_5_vl,
    "idefics3": save_tiny_idefics3,
    "smolvlm": save_tiny_smolvlm,
    "paligemma": save_tiny_paligemma,
    "florence2": save_tiny_florence2,
}


def sized_jpeg(n: int, width: int, height: int) -> bytes:
    """A deterministic non-square picture: noise-free colour field with a shape, `width` x `height`."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), ((n * 70) % 256, (n * 40 + 90) % 256, (n * 25 + 30) % 256))
    ImageDraw.Draw(image).ellipse(
        (width // 4, height // 5, width // 2 + n, height // 2 + n), fill=(250, 240, 20)
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def make_sized_image_shards(root: Path, sizes: list[list[tuple[int, int]]]) -> list[list[str]]:
    """Image shards as the download stage leaves them, one shard per list of (width, height); returns
    the keys per shard. Row n gets `sized_jpeg(n, ...)` and alt text `alt n`."""
    from shards import markers
    from shards.tars import write_tar_atomic

    images, keys, n = Path(root) / "images", [], 0
    for s, shard_sizes in enumerate(sizes):
        samples = []
        for width, height in shard_sizes:
            samples.append((f"{n:09d}", {"jpg": sized_jpeg(n, width, height), "txt": f"alt {n}".encode()}))
            n += 1
        info = write_tar_atomic(images / f"{s:06d}.tar", samples)
        counts = {"ok": len(samples)}
        marker = {**FAKE_MARKER, "unit": f"{s:06d}", "counts": counts, **info}
        markers.write_marker(images, f"{s:06d}", marker)
        keys.append([k for k, _ in samples])
    markers.write_success(images, {"stage": "download", "fingerprint": "made-by-test"})
    return keys
