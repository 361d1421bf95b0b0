"""One model through every benchmark of an evaluate config: embed (cached), then the metrics.

`evaluate_model` returns a flat-ish dict written to `evaluate/<name>/metrics/<model>.json`:
  i2i_map:{dataset: mAP}, i2i_map_by_group:{dataset: {group: mAP}}, knn_top1, zero_shot:{top1, top5},
  text_to_image:{R@1, R@5, R@10, mAP}; every value a fraction in [0, 1].
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from shards.atomic import write_json_atomic
from stages.errors import StageConfigError
from stages.evaluate import datasets, metrics
from stages.evaluate.embed import cached, embed_images

log = logging.getLogger(__name__)


def load_images(source, root: Path, name: str) -> datasets.ImageSet:
    if source.layout == "gpr1200":
        return datasets.gpr1200_folder(source.path, name)
    if source.layout == "folder":
        return datasets.image_folder(source.path, name)
    return datasets.shard_images(source.path or root, name)[0]


def load_captions(section, root: Path) -> datasets.CaptionSet:
    if section.layout == "karpathy":
        return datasets.karpathy_captions(section.path, section.image_root, section.split, "text_to_image")
    return datasets.shard_captions(section.path or root, section.captions, "text_to_image")


class Datasets:
    """Every dataset of the config, loaded on first use and shared by all models."""

    def __init__(self, cfg, root: Path) -> None:
        self.cfg, self.root = cfg, Path(root)

    @cached_property
    def retrieval(self) -> dict[str, datasets.ImageSet]:
        return {name: load_images(source, self.root, name) for name, source in self.cfg.retrieval.items()}

    @cached_property
    def knn(self) -> datasets.ImageSet:
        return load_images(self.cfg.knn.data, self.root, "knn")

    @cached_property
    def zero_shot(self) -> datasets.ImageSet:
        return load_images(self.cfg.zero_shot.data, self.root, "zero_shot")

    @cached_property
    def text_to_image(self) -> datasets.CaptionSet:
        return load_captions(self.cfg.text_to_image, self.root)

    def image_sets(self) -> list[datasets.ImageSet]:
        sets = list(self.retrieval.values())
        sets += [self.knn] if self.cfg.knn else []
        sets += [self.zero_shot] if self.cfg.zero_shot else []
        sets += [self.text_to_image.images] if self.cfg.text_to_image else []
        return sets


def evaluate_model(cfg, root: Path, entry, identity: str | None, data: Datasets, out: Path) -> dict[str, Any]:
    """`identity`: the model's fingerprint (stages.evaluate.model_identity), keying its cached embeddings."""
    from captioning.base import CaptionerError
    from captioning.clip_models import load_clip
    from stages.evaluate import model_checkpoint

    checkpoint = model_checkpoint(root, entry)
    try:
        clip = load_clip(cfg.model, checkpoint, cfg.config_dir, cfg.device)
    except CaptionerError as err:  # unknown architecture, missing or unloadable checkpoint
        raise StageConfigError(f"evaluate: model {entry.name!r}: {err}") from None
    log.info("evaluate: model %s (%s)", entry.name, checkpoint or "random weights")

    def image_embeddings(images: datasets.ImageSet) -> np.ndarray:
        about = {"model": identity, "images": images.identity(), "image_size": clip.image_size}
        return cached(
            embedding_file(out, entry.name, images),
            about,
            lambda: embed_images(clip, images, cfg.batch_size, cfg.num_workers),
        )

    result: dict[str, Any] = {}
    for name, images in data.retrieval.items():
        result.update(_merge(result, retrieval(image_embeddings(images), images, name)))
    if cfg.knn:
        result["knn_top1"] = knn_top1(image_embeddings(data.knn), data.knn.labels, cfg.knn)
    if cfg.zero_shot:
        result["zero_shot"] = zero_shot(
            clip, image_embeddings(data.zero_shot), data.zero_shot.labels, cfg.zero_shot
        )
    if cfg.text_to_image:
        captions = data.text_to_image
        result["text_to_image"] = text_to_image(
            image_embeddings(captions.images),
            clip.encode_texts(captions.texts),
            captions.owners,
            cfg.text_to_image.ks,
        )
    write_json_atomic(out / "metrics" / f"{entry.name}.json", result)
    return result


def embedding_file(out: Path, model: str, images: datasets.ImageSet) -> Path:
    """By content, not by dataset name: sets of the same images (e.g. one folder used for retrieval,
    k-NN and zero-shot) share one file."""
    return out / "embeddings" / model / f"{images.identity()}.npy"


def _merge(result: dict[str, Any], part: dict[str, dict]) -> dict[str, Any]:
    return {family: {**result.get(family, {}), **values} for family, values in part.items()}


def retrieval(emb: np.ndarray, images: datasets.ImageSet, name: str) -> dict[str, dict]:
    part = {"i2i_map": {name: metrics.retrieval_map(emb, images.labels)}}
    if images.groups is not None:
        part["i2i_map_by_group"] = {name: metrics.retrieval_map_by_group(emb, images.labels, images.groups)}
    return part


def text_to_image(img_emb: np.ndarray, txt_emb: np.ndarray, owners, ks) -> dict[str, float]:
    return {
        **metrics.text_to_image_recall(img_emb, txt_emb, owners, ks),
        "mAP": metrics.text_to_image_map(img_emb, txt_emb, owners),
    }


def alternate_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (gallery, queries): within each class, images alternate gallery, query, ..."""
    position = np.zeros(len(labels), dtype=int)
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        position[i] = seen.get(label, 0)
        seen[label] = position[i] + 1
    gallery = position % 2 == 0
    return gallery, ~gallery


def knn_top1(emb: np.ndarray, labels: np.ndarray, section) -> float:
    gallery, queries = alternate_split(labels)
    return metrics.knn_accuracy(
        emb[gallery], labels[gallery], emb[queries], labels[queries], section.k, section.temperature
    )


def class_prompts(names: list[str], templates: list[str] | None) -> list[list[str]]:
    if templates is None:
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [[t(name) for t in OPENAI_IMAGENET_TEMPLATES] for name in names]
    return [[t.format(name) for t in templates] for name in names]


def zero_shot(clip, img_emb: np.ndarray, labels: np.ndarray, section) -> dict[str, float]:
    """Images labelled by folder/class; their class name from the names file (names shared by
    several labels form one class)."""
    mapping = datasets.class_names(section.class_names)
    missing = sorted(set(labels) - set(mapping))
    if missing:
        raise StageConfigError(f"{section.class_names}: no class name for label(s) {missing[:5]}")
    names = list(dict.fromkeys(mapping[label] for label in labels))
    index = {name: i for i, name in enumerate(names)}
    prompts = class_prompts(names, section.templates)
    per_template = len(prompts[0])
    text = clip.encode_texts([p for group in prompts for p in group]).reshape(len(names), per_template, -1)
    class_emb = metrics.normalise(text.mean(axis=1))
    return metrics.zero_shot_accuracy(
        img_emb, np.array([index[mapping[label]] for label in labels]), class_emb
    )
