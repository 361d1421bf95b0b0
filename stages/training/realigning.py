"""The realign stage's work: image embeddings of the fine-tuned model (one resumable unit per shard),
then InfoNCE (or, with `loss: siglip`, SigLIP's sigmoid loss) training of the unlocked text layers
against them. See stages/realign.py; what unlocks in each model family: captioning/clip_family.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from shards.atomic import atomic_write, remove_orphans
from shards.captions import ALT_TEXT
from stages.base import RunContext, UnitPlan, plan_units
from stages.errors import StageConfigError
from stages.layout import RunLayout
from stages.training.data import (
    CaptionedImages,
    EmbeddedTexts,
    eval_transform,
    index_samples,
    loaders,
    steps_per_epoch,
)
from stages.training.engine import gather_with_grad
from stages.training.loop import LoopPlan, cosine_lr, run_loop
from stages.training.losses import clip_infonce_loss, siglip_loss
from stages.training.model import build_model, freeze_for_realign
from stages.training.setup import (
    adamw,
    checkpoint_identity,
    drop_stale_checkpoints,
    engine_for,
    finish_training,
    global_batch_plan,
    verified_units,
)

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100)


def train(cfg, ctx: RunContext, plan: UnitPlan) -> None:
    source_folder = RunLayout(ctx.root).finetune(cfg.source_name)
    source = RunLayout.final_model(source_folder)
    architecture = json.loads(RunLayout.final_architecture(source_folder).read_text())
    arch = cfg.model or architecture["model"]
    config_dir = str(cfg.config_dir) if cfg.config_dir else architecture["config_dir"]
    global_batch, accumulation = global_batch_plan("realign", cfg, ctx, plan.stage_dir, plan.fingerprint)
    engine = engine_for(cfg, ctx, accumulation)
    clip = build_model(arch, str(source), config_dir, str(engine.device))
    # before the image embeddings: a bad unlocked_layers or a sigmoid loss without logit_bias fails at once
    freeze_for_realign(clip.model, cfg.unlocked_layers, train_logit_bias=cfg.loss == "siglip")
    alt_text = cfg.captions == ALT_TEXT
    units = verified_units(ctx.root, None if alt_text else cfg.captions, engine)
    refs = index_samples(ctx.root, units, None if alt_text else cfg.captions)
    embeddings = image_embeddings(cfg, ctx, clip, refs, units, engine, source)
    texts = [r.alt_text if alt_text else (r.captions[0] if r.captions else "") for r in refs]
    keep = [i for i, text in enumerate(texts) if text.strip()]
    dataset = EmbeddedTexts(embeddings[keep], [texts[i] for i in keep], clip.tokenizer, ctx.seed)
    per_epoch = steps_per_epoch(len(dataset), global_batch)
    if per_epoch == 0:
        raise StageConfigError(
            f"realign: {len(dataset)} image-text pairs are fewer than one batch of "
            f"{global_batch} ({cfg.batch_size} x {engine.world_size} processes x {accumulation})"
        )
    total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
    optimizer = adamw(
        clip.model.named_parameters(), {}, cfg.betas, cfg.eps, cfg.weight_decay, decay_matrices_only=True
    )
    ceiling = logit_scale_ceiling(clip.model)
    model, optimizer = engine.prepare(clip.model, optimizer)
    loop_plan = LoopPlan(
        plan.stage_dir,
        plan.fingerprint,
        per_epoch,
        total,
        cfg.batch_size,
        cfg.checkpoint_every,
        cosine_lr(cfg.lr, cfg.min_lr, total),
        global_batch=global_batch,
        accumulation=accumulation,
        record_samples=cfg.record_samples,
    )
    drop_stale_checkpoints(plan.stage_dir, plan.fingerprint, ctx, engine)

    batches = loaders(dataset, engine, cfg.batch_size, global_batch, cfg.num_workers)

    result = run_loop(
        engine,
        model,
        optimizer,
        loop_plan,
        batches,
        lambda b: _loss(engine.unwrap(model), b, engine.device, cfg.loss, ceiling),
    )
    if result.stopped_by_signal or result.step < total:
        return
    finish_training(
        engine,
        engine.unwrap(model),
        {"model": arch, "config_dir": config_dir},
        plan,
        plan.stage_dir,
        {"counts": {"steps": result.step, "samples_seen": result.samples_seen, "pairs": len(dataset)}},
    )


def logit_scale_ceiling(model) -> float:
    """METHOD.md keeps the learnable logit scale in [0, ln 100]; a model loaded with a higher one of
    its own (a SigLIP checkpoint's can be) keeps that as its ceiling instead of being cut at step 1."""
    return max(MAX_LOGIT_SCALE, float(model.logit_scale.detach().max()))


def _loss(
    model, batch: dict, device, loss: str = "infonce", ceiling: float = MAX_LOGIT_SCALE
) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        model.logit_scale.clamp_(0, ceiling)
    text_emb = model.encode_text(batch["tokens"].to(device))
    image_emb = batch["emb"].to(device, text_emb.dtype)
    images, texts, scale = gather_with_grad(image_emb), gather_with_grad(text_emb), model.logit_scale.exp()
    if loss == "siglip":
        return siglip_loss(images, texts, scale, model.logit_bias), {
            "logit_scale": scale.detach(),
            "logit_bias": model.logit_bias.detach(),
        }
    return clip_infonce_loss(images, texts, scale), {"logit_scale": scale.detach()}


def image_embeddings(cfg, ctx: RunContext, clip, refs, units: list[str], engine, source: Path) -> np.ndarray:
    """`embeddings/<name>/<shard>.npy` for every shard (this rank's share first, then any still
    missing), concatenated in shard and key order."""
    folder = RunLayout(ctx.root).embeddings(cfg.name)
    # the images too: embeddings of re-downloaded shards must not be reused from the cache
    images = RunLayout(ctx.root).downloaded().fingerprint
    settings = {"source": checkpoint_identity(str(source)), "images": images, "format_version": 1}
    preprocess = clip.model.visual.preprocess_cfg
    dataset = CaptionedImages(
        refs,
        eval_transform(clip.image_size, preprocess["mean"], preprocess["std"]),
        clip.tokenizer,
        k=0,
        seed=ctx.seed,
    )
    per_unit = Counter(r.tar.stem for r in refs)
    starts = np.cumsum([0] + [per_unit[u] for u in units])
    clip.model.eval()
    shares = dataclasses.replace(ctx, rank=engine.rank, world_size=engine.world_size)
    for split in (True, False):  # own share, then (after everyone finished theirs) whatever is left
        unit_plan = plan_units("embed", folder, units, settings, shares, split_by_rank=split)
        for unit in unit_plan.mine if split else ():  # a killed run's temporary files of this rank's units
            remove_orphans(folder, unit)
        for unit in unit_plan.mine:
            i = units.index(unit)
            vectors = _embed(clip, dataset, range(starts[i], starts[i + 1]), cfg, engine.device)
            with atomic_write(folder / f"{unit}.npy") as handle:
                np.save(handle, vectors)
            unit_plan.mark_done(unit, {"rows": len(vectors)}, outputs=[folder / f"{unit}.npy"])
        engine.barrier()
    clip.model.train()
    return np.concatenate([np.load(folder / f"{u}.npy") for u in units])


@torch.inference_mode()
def _embed(clip, dataset, indexes, cfg, device) -> np.ndarray:
    loader = DataLoader(
        dataset, batch_size=cfg.embed_batch_size, sampler=list(indexes), num_workers=cfg.num_workers
    )
    dtype = next(clip.model.visual.parameters()).dtype
    chunks = [
        torch.nn.functional.normalize(
            clip.model.encode_image(b["image"].to(device, dtype)).float(), dim=-1
        ).cpu()
        for b in loader
    ]
    return torch.cat(chunks).numpy().astype(np.float32)
