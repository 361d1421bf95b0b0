"""The world's "pretrained CLIP": a tiny open_clip model pre-trained with InfoNCE on the world's
pre-training split, so it has learned shape, colour and background before any fine-tuning.

Reads  WORLD/pretrain.parquet (examples/world.py).
Writes OUT/open_clip_configs/mcip-world-rn.json and OUT/mcip-world-rn.pt ({"state_dict": ...}, written
       atomically, last), which the stages load through the normal local-checkpoint path.
Run    python -m examples.world_clip WORLD OUT [--steps 1500] [--seed 0]

Image tower: open_clip's ModifiedResNet at width 16 (a tiny ViT did not learn shape within minutes on
2 cores; shared/METHOD.md). Skips the work when OUT already holds a model made with the same settings.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from shards.atomic import write_json_atomic
from stages.training.losses import clip_infonce_loss
from stages.training.model import build_model, export_model

log = logging.getLogger(__name__)

ARCH = "mcip-world-rn"
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


def pretrained_model(
    world: Path, out: Path, steps: int = 1500, seed: int = 0, batch_size: int = 32, lr: float = 1e-3
) -> tuple[str, Path, Path]:
    """(architecture, checkpoint, config folder); trains only when no model with these settings exists."""
    out = Path(out)
    config_dir = out / "open_clip_configs"
    config_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config_dir / f"{ARCH}.json", CONFIG)  # unchanged content: file left alone
    checkpoint, about = out / f"{ARCH}.pt", out / f"{ARCH}.json"
    settings = {
        "world": str(Path(world).resolve()),
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "config": CONFIG,
    }
    if checkpoint.exists() and about.exists() and json.loads(about.read_text()) == settings:
        return ARCH, checkpoint, config_dir
    torch.manual_seed(seed)
    clip = build_model(ARCH, None, config_dir)
    images, captions = load_pretrain_split(Path(world) / "pretrain.parquet", clip.preprocess)
    train(clip, images, captions, steps, seed, batch_size, lr)
    export_model(clip.model, checkpoint)
    write_json_atomic(about, settings)  # last: the checkpoint counts only with its settings beside it
    return ARCH, checkpoint, config_dir


def load_pretrain_split(path: Path, preprocess) -> tuple[torch.Tensor, list[str]]:
    table = pq.read_table(path)
    pixels = [preprocess(Image.open(io.BytesIO(data)).convert("RGB")) for data in table["jpg"].to_pylist()]
    return torch.stack(pixels), table["caption"].to_pylist()


def train(
    clip, images: torch.Tensor, captions: list[str], steps: int, seed: int, batch_size: int, lr: float
) -> None:
    """AdamW, short warm-up + cosine schedule over `steps` random batches; horizontal flips as the only
    augmentation."""
    model = clip.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * step / steps))
    )
    rng = np.random.default_rng(seed)
    tokens = clip.tokenizer(captions)
    bar = tqdm(range(steps), desc="pre-train world CLIP", unit="step")
    for _ in bar:
        batch = torch.from_numpy(rng.choice(len(captions), size=batch_size, replace=False))
        pixels = images[batch]
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        image_emb, text_emb, scale = model(pixels, tokens[batch])[:3]
        loss = clip_infonce_loss(image_emb, text_emb, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arch, checkpoint, _ = pretrained_model(args.world, args.out, args.steps, args.seed)
    print(f"{arch}: {checkpoint}")


if __name__ == "__main__":
    main()
