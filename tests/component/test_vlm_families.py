"""Every generative caption family through the caption stage, on tiny random-weight models of the real
transformers classes (tests/helpers/tiny_vlms.py) and pictures of different sizes and aspect ratios.

The reference is each model's own documented call, made here directly: its processor on the batch's
pictures with the family's prompt (chat template / task prompt / prefix), `model.generate`, and the new
tokens decoded (decoder-only outputs sliced after the input length). Caption shards must hold exactly
those captions, for beam search and for sampling (seeded as stages/caption/work.py seeds each batch).
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.cli import main as cli
from shards.reader import iter_samples
from stages.caption.images import decode_image, image_batches
from stages.caption.work import _batch_seed
from tests.conftest import write_caption_manifest
from tests.helpers.tiny_vlms import BUILDERS, make_sized_image_shards

# two shards of three pictures: with batch_size 4 and no workers each batch is one shard (3 pictures
# and the end-of-shard item), which the reference reproduces
SIZES = [[(64, 64), (96, 48), (40, 72)], [(72, 40), (48, 96), (56, 56)]]
K, NEW_TOKENS = 2, 4
FIXED = {"blip", "blip-2", "llava", "paligemma", "florence2"}  # fixed-size processors: draft decoding
PROMPTS = {"paligemma": "caption en", "florence2": "<MORE_DETAILED_CAPTION>", "blip": None, "blip-2": None}
CHAT_PROMPT = "Describe the image in one sentence."
CLASSES = {
    "blip": "BlipForConditionalGeneration",
    "blip-2": "Blip2ForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
    "florence2": "Florence2ForConditionalGeneration",
}
DECODING = {
    "beam": {"do_sample": False, "num_beams": K},
    "sample": {"do_sample": True, "top_p": 0.9, "top_k": 0, "temperature": 1.0, "num_beams": 1},
}


def _load(folder):
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = getattr(transformers, CLASSES[folder.name]).from_pretrained(folder).eval()
    return processor, model


def _prompt(family: str, processor) -> str | None:
    if family in PROMPTS:
        return PROMPTS[family]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHAT_PROMPT}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def _pictures(root, family: str) -> list[list[tuple[str, Image.Image]]]:
    """Per shard (key, picture): any-resolution families see the full picture, fixed-size ones the
    picture as the stage decodes it (JPEG DCT scaling toward their 32 px input)."""
    shards = []
    for tar in sorted((root / "images").glob("*.tar")):
        samples = list(iter_samples([tar]))
        if family in FIXED:
            shards.append([(s["__key__"], decode_image(s["jpg"], 32)) for s in samples])
        else:
            shards.append([(s["__key__"], Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in samples])
    return shards


@torch.inference_mode()
def _reference(family: str, processor, model, shard, decoding: str) -> list[list[str]]:
    """The model's documented captioning call on one batch, new tokens only, k per picture."""
    keys, images = [k for k, _ in shard], [im for _, im in shard]
    prompt = _prompt(family, processor)
    if family in ("idefics3", "smolvlm"):
        images = [[image] for image in images]
    if prompt is None:
        inputs = processor(images=images, return_tensors="pt")
    else:
        if hasattr(processor, "tokenizer") and family != "florence2":
            processor.tokenizer.padding_side = "left"
        inputs = processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")
    inputs.pop("labels", None)
    torch.manual_seed(_batch_seed(0, keys[0]))
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "num_return_sequences": K}
    output = model.generate(**inputs, **kwargs, **DECODING[decoding])
    if family not in ("blip", "blip-2", "florence2"):  # decoder-only with a prompt: trim the input
        output = output[:, inputs["input_ids"].shape[1] :]
    texts = [" ".join(t.split()) for t in processor.batch_decode(output, skip_special_tokens=True)]
    return [[t for t in texts[i * K : (i + 1) * K] if t] for i in range(len(keys))]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-run") / "run"
    keys = make_sized_image_shards(root, SIZES)
    return root, keys


@pytest.mark.parametrize("family", list(BUILDERS))
def test_family_captions_equal_its_own_generate(tmp_path, run_root, family):
    root, keys = run_root
    folder = BUILDERS[family](tmp_path / family)
    processor, model = _load(folder)
    for decoding in ("beam", "sample"):
        tag = f"{family.replace('_', '-')}-{decoding}".replace(".", "-")
        caption = {
            "backend": "vlm",
            "model": str(folder),
            "captions": tag,
            "captions_per_image": K,
            "generation": {"decoding": decoding, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS},
            "filter": {"min_words": 0, "dedupe": False},
        }
        manifest = write_caption_manifest(tmp_path, caption, root=str(root), name=f"{tag}.yaml")
        assert cli(["run", str(manifest), "--stage", "caption"]) == 0
        for unit, unit_keys, shard in zip(("000000", "000001"), keys, _pictures(root, family)):
            rows = pq.read_table(root / "captions" / tag / f"{unit}.parquet").to_pylist()
            assert [r["key"] for r in rows] == unit_keys
            want = _reference(family, processor, model, shard, decoding)
            got = [r["captions"] for r in rows]
            assert got == want, f"{family} {decoding} shard {unit}"
            for captions in got:  # k captions, each only the new tokens: no echoed prompt or transcript
                assert len(captions) == K
                assert all(len(c.split()) <= NEW_TOKENS for c in captions)


def test_llava_next_sees_the_full_picture(tmp_path, run_root):
    """The worker decodes a 64 px JPEG at 64 px for LLaVA-NeXT, so its tile grid is the full size's
    (2 x 2 tiles + the base image), not the 32 px base crop's."""
    from captioning.base import get_captioner

    root, _ = run_root
    captioner = get_captioner("vlm", model=str(BUILDERS["llava_next"](tmp_path / "llava_next")), k=1)
    loader = image_batches(
        [("000000", root / "images" / "000000.tar")],
        [captioner.image_transform()],
        captioner.input_size,
        batch_size=4,
        workers=1,
    )
    inputs = next(iter(loader))["tensors"][0][0]
    assert inputs["image_sizes"].tolist() == [[64, 64], [48, 96], [72, 40]]  # (height, width)
    assert inputs["pixel_values"].shape[:2] == (3, 5)
    shrunk = captioner.image_transform()(
        [decode_image(next(iter_samples([root / "images" / "000000.tar"]))["jpg"], 32)]
    )
    assert shrunk[0]["pixel_values"].shape[1] < 5  # what the old base-crop decoding gave it


def test_an_unsupported_family_is_a_clear_error(tmp_path):
    from transformers import BertConfig

    from captioning.base import CaptionerError, get_captioner

    BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path)
    with pytest.raises(
        CaptionerError, match=r"model type 'bert' is not a supported caption family .*Qwen2-VL"
    ):
        get_captioner("vlm", model=str(tmp_path), k=1)


PREFIXES = ["a picture of", "a photo of"]
TURNS = [CHAT_PROMPT, "what is this"]


@pytest.mark.parametrize("family", ["blip", "blip-2", "qwen2_vl"])
def test_one_caption_per_prompt_without_the_prompt(tmp_path, run_root, family):
    """`decoding: prompts`: greedy, one caption per prompt; BLIP's text prefix and a chat turn are cut
    off by token position, so the caption is what follows the prompt in the model's own output."""
    root, keys = run_root
    folder = BUILDERS[family](tmp_path / family)
    processor, model = _load(folder)
    processor.tokenizer.padding_side = "left"  # batched generation, as the model cards set it
    prompts = TURNS if family == "qwen2_vl" else PREFIXES
    caption = {
        "backend": "vlm",
        "model": str(folder),
        "captions": "prompts-" + family.replace("_", "-"),
        "generation": {
            "decoding": "prompts",
            "prompts": prompts,
            "max_new_tokens": NEW_TOKENS,
            "min_new_tokens": NEW_TOKENS,
        },
        "filter": {"min_words": 0, "dedupe": False},
    }
    assert (
        cli(["run", str(write_caption_manifest(tmp_path, caption, root=str(root))), "--stage", "caption"])
        == 0
    )
    rows = pq.read_table(root / "captions" / caption["captions"] / "000000.parquet").to_pylist()
    images = [image for _, image in _pictures(root, family)[0]]
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "num_beams": 1}
    for p, prompt in enumerate(prompts):
        if family == "qwen2_vl":
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True,
            )
        else:
            text = prompt
        inputs = processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, **kwargs)
        if family == "qwen2_vl":  # the model card's trim of the input
            texts = processor.batch_decode(
                output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
        else:  # BLIP's documented output starts with the prefix text itself
            full = processor.batch_decode(output, skip_special_tokens=True)
            assert all(t.startswith(prompt) for t in full)
            texts = [t[len(prompt) :] for t in full]
        for row, want in zip(rows, texts):
            assert row["captions"][p] == " ".join(want.split())
    assert rows[0]["prompts"] == prompts


def test_a_picture_the_processor_refuses_is_counted_not_fatal(tmp_path):
    """Qwen's processor refuses an aspect ratio above 200: that picture is counted as corrupt and
    gets no captions; the other pictures of its batch are captioned as usual."""
    import json

    root = tmp_path / "run"
    keys = make_sized_image_shards(root, [[(64, 48), (400, 1), (40, 72)]])
    folder = BUILDERS["qwen2_vl"](tmp_path / "qwen2_vl")
    caption = {
        "backend": "vlm",
        "model": str(folder),
        "captions_per_image": 1,
        "generation": {"max_new_tokens": 2, "min_new_tokens": 2},
    }
    assert (
        cli(["run", str(write_caption_manifest(tmp_path, caption, root=str(root))), "--stage", "caption"])
        == 0
    )
    rows = pq.read_table(root / "captions" / "vlm" / "000000.parquet").to_pylist()
    assert [r["key"] for r in rows] == keys[0]
    assert [len(r["captions"]) > 0 for r in rows] == [True, False, True]
    marker = json.loads((root / "captions" / "vlm" / "_done" / "000000.json").read_text())
    assert marker["counts"]["corrupt_images"] == 1
