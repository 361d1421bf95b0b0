"""open_clip models for retrieval captioning and CLIP scoring.

An architecture name plus a pretrained tag (`openai`), a local checkpoint file, or a hub name
(`hf-hub:org/name` as the architecture); extra architectures (e.g. tiny test models) come from a
folder of open_clip JSON configs. Embeddings are L2-normalised float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from captioning.base import CaptionerError, torch_dtype
from captioning.clip_family import embed_dim

log = logging.getLogger(__name__)


@dataclass
class ClipModel:
    name: str
    model: Any
    preprocess: Any  # the eval transform: PIL image -> tensor (picklable)
    tokenizer: Any
    device: str
    dtype: torch.dtype

    @property
    def image_size(self) -> int:
        return _side(self.model.visual.image_size)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(pixels.to(self.device, self.dtype))
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 1024, progress: bool = False) -> np.ndarray:
        chunks = []
        for start in tqdm(
            range(0, len(texts), batch_size), desc="embed texts", unit="batch", disable=not progress
        ):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
            features = self.model.encode_text(tokens)
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        if not chunks:  # the width lives in a different place in each model family
            return np.zeros((0, embed_dim(self.model)), np.float32)
        return np.concatenate(chunks)


def register_configs(config_dir: Path | None) -> None:
    """Make the open_clip JSON configs in `config_dir` known as architectures."""
    if config_dir is None:
        return
    import open_clip

    if not Path(config_dir).is_dir():
        raise CaptionerError(f"open_clip config folder not found: {config_dir}")
    open_clip.add_model_config(str(config_dir))


def _side(size) -> int:
    return max(size) if isinstance(size, (tuple, list)) else int(size)


def load_clip(
    arch: str,
    pretrained: str | Path | None = None,
    config_dir: Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> ClipModel:
    import open_clip

    pretrained = str(pretrained) if pretrained is not None else None
    register_configs(config_dir)
    if not arch.startswith("hf-hub:") and arch not in open_clip.list_models():
        raise CaptionerError(
            f"unknown open_clip architecture {arch!r} (add its JSON config folder with config_dir)"
        )
    if (
        pretrained
        and ("/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")))
        and not Path(pretrained).is_file()
    ):
        raise CaptionerError(f"open_clip checkpoint not found: {pretrained}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, device=device
        )
    except (RuntimeError, OSError, ValueError) as err:
        raise CaptionerError(
            f"cannot load open_clip model {arch!r} ({pretrained}): {str(err).splitlines()[0]}"
        ) from err
    model = model.to(torch_dtype(dtype)).eval()
    return ClipModel(
        f"{arch}:{pretrained or 'random'}",
        model,
        preprocess,
        open_clip.get_tokenizer(arch),
        device,
        torch_dtype(dtype),
    )


@dataclass(frozen=True)
class EvalTransform:
    preprocess: Any  # the eval transform: PIL image -> tensor
    image_size: int
    config: dict  # open_clip's preprocess config, which the transform is built from


def eval_transform(
    arch: str, pretrained: str | Path | None = None, config_dir: Path | None = None
) -> EvalTransform | None:
    """The eval transform `load_clip(arch, pretrained, config_dir)` will have, without its weights:
    open_clip resolves the architecture's config and builds the model on the meta device (tens of
    milliseconds), so a caller can start its DataLoader workers while the weights load. Nothing is
    downloaded: a pretrained tag adds only its preprocess settings, no tower's base weights are
    fetched, and an `hf-hub:` architecture (config and weights on the hub) gets None, as does any
    model open_clip cannot build so. The caller compares `config` with the loaded model's."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    if arch.startswith("hf-hub:"):
        return None
    tag = str(pretrained) if pretrained and not Path(pretrained).is_file() else None
    root = logging.getLogger()
    quiet = lambda record: "open_clip" not in record.pathname  # noqa: E731 (its "no weights" lines)
    root.addFilter(quiet)
    try:
        register_configs(config_dir)
        with torch.device("meta"):
            model = open_clip.create_model(
                arch,
                load_weights=False,
                pretrained_text=False,
                device="meta",
                force_preprocess_cfg=merge_preprocess_dict({}, open_clip.get_pretrained_cfg(arch, tag))
                if tag
                else {},
            )
        config = dict(model.visual.preprocess_cfg)
        preprocess = image_transform_v2(PreprocessCfg(**config), is_train=False)
        return EvalTransform(preprocess, _side(model.visual.image_size), config)
    except Exception as err:  # any model open_clip cannot build on meta: only the early start is lost
        log.debug("%s: no transform before loading its weights (%s)", arch, err)
        return None
    finally:
        root.removeFilter(quiet)
