"""The finetune stage's work: build the model and data, run the loop with the MCIP (or GPR) loss,
export the final model. See stages/finetune.py for the stage's inputs and outputs."""

from __future__ import annotations

import logging

import torch

from stages.base import RunContext, UnitPlan
from stages.errors import StageConfigError
from stages.layout import RunLayout, read_labels
from stages.training.data import (
    CaptionedImages,
    index_samples,
    loaders,
    steps_per_epoch,
    train_transform,
)
from stages.training.loop import LoopPlan, cosine_lr, run_loop
from stages.training.losses import arc_margin_loss, multi_caption_loss
from stages.training.model import WithProxies, build_model, freeze_for_finetune
from stages.training.setup import (
    adamw,
    drop_stale_checkpoints,
    engine_for,
    finish_training,
    global_batch_plan,
    verified_units,
)

log = logging.getLogger(__name__)


def train(cfg, ctx: RunContext, plan: UnitPlan) -> None:

    global_batch, accumulation = global_batch_plan("finetune", cfg, ctx, plan.stage_dir, plan.fingerprint)
    engine = engine_for(cfg, ctx, accumulation)
    clip = build_model(cfg.model, cfg.pretrained, cfg.config_dir, str(engine.device))
    freeze_for_finetune(clip.model)
    torch.manual_seed(ctx.seed)  # the same proxies on every rank
    module = WithProxies(clip.model, _class_count(ctx.root))
    dataset = _dataset(cfg, ctx, clip, engine)
    per_epoch = steps_per_epoch(len(dataset), global_batch)
    if per_epoch == 0:
        raise StageConfigError(
            f"finetune: {len(dataset)} samples are fewer than one batch of "
            f"{global_batch} ({cfg.batch_size} x {engine.world_size} processes x {accumulation})"
        )
    total = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
    optimizer = adamw(
        module.named_parameters(),
        {"proxies": cfg.proxy_lr_multiplier},
        cfg.betas,
        cfg.eps,
        cfg.weight_decay,
        decay_matrices_only=False,
    )
    model, optimizer = engine.prepare(module, optimizer)
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
        lambda batch: _loss(cfg, engine.unwrap(model), batch, engine.device),
    )
    if result.stopped_by_signal or result.step < total:
        return
    architecture = {"model": cfg.model, "config_dir": str(cfg.config_dir) if cfg.config_dir else None}
    finish_training(
        engine,
        engine.unwrap(model).clip,
        architecture,
        plan,
        plan.stage_dir,
        {"counts": {"steps": result.step, "samples_seen": result.samples_seen}},
    )


def _class_count(root) -> int:
    labels = read_labels(RunLayout(root))
    if labels is None:
        raise StageConfigError(
            f"finetune needs class labels: {RunLayout(root).labels_file} is missing "
            "(set label_col in download)"
        )
    return len(labels)


def _dataset(cfg, ctx: RunContext, clip, engine) -> CaptionedImages:
    units = verified_units(ctx.root, cfg.captions if cfg.loss == "mcip" else None, engine)
    refs = index_samples(ctx.root, units, cfg.captions if cfg.loss == "mcip" else None)
    unlabelled = next((r for r in refs if r.cls < 0), None)
    if unlabelled is not None:
        raise StageConfigError(
            f"finetune needs class labels: {unlabelled.tar} has no .cls for key {unlabelled.key}"
        )
    preprocess = clip.model.visual.preprocess_cfg
    transform = train_transform(clip.image_size, preprocess["mean"], preprocess["std"])
    return CaptionedImages(refs, transform, clip.tokenizer, cfg.captions_per_image, ctx.seed)


def _loss(cfg, module: WithProxies, batch: dict, device) -> tuple[torch.Tensor, dict]:
    dtype = next(module.clip.visual.parameters()).dtype
    images, labels = batch["image"].to(device, dtype), batch["cls"].to(device)
    image_emb = module.clip.encode_image(images)
    arc = arc_margin_loss(image_emb, labels, module.proxies, cfg.scale, cfg.margin)
    if cfg.loss == "gpr":
        return arc, {"arc_margin": arc.detach()}
    mask = batch["mask"]
    owner = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask].to(device)
    with torch.no_grad():  # the text tower is frozen: its caption embeddings are targets
        caption_emb = module.clip.encode_text(batch["tokens"][mask].to(device))
    multi = multi_caption_loss(image_emb, caption_emb, owner, cfg.scale, cfg.margin, cfg.max_term_weight)
    loss = cfg.arc_weight * arc + cfg.caption_weight * multi
    return loss, {"arc_margin": arc.detach(), "multi_caption": multi.detach()}
