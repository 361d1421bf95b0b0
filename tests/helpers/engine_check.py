"""Run by the engine test under torchrun: a few MCIP steps on one repeated batch with the given engine.

    torchrun --nproc_per_node 2 tests/helpers/engine_check.py OUT_DIR ARCH CHECKPOINT CONFIG_DIR [DS_CONFIG]

Writes OUT_DIR/rank<r>.json: losses per step, whether the text tower stayed bit-identical, whether
the image tower changed, a checksum of the proxies and the peak resident memory (benchmarks/train.py).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.training.engine import gather_with_grad, make_engine  # noqa: E402
from stages.training.losses import arc_margin_loss, multi_caption_loss  # noqa: E402
from stages.training.model import WithProxies, build_model, freeze_for_finetune  # noqa: E402


def main() -> None:
    out, arch, checkpoint, config_dir = Path(sys.argv[1]), *sys.argv[2:5]
    ds_config = sys.argv[5] if len(sys.argv) > 5 else None
    torch.manual_seed(0)
    clip = build_model(arch, checkpoint, config_dir)
    freeze_for_finetune(clip.model)
    module = WithProxies(clip.model, classes=3)
    text_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    image_before = module.clip.visual.conv1.weight.detach().clone()
    groups = [
        {
            "params": [p for n, p in module.named_parameters() if p.requires_grad and n != "proxies"],
            "lr": 1e-3,
        },
        {"params": [module.proxies], "lr": 1e-1},
    ]
    engine = make_engine(ds_config, micro_batch=4, grad_clip=1.0)
    model, optimizer = engine.prepare(module, torch.optim.AdamW(groups, weight_decay=0.01))
    generator = torch.Generator().manual_seed(100 + engine.rank)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    labels = torch.tensor([0, 1, 2, 0])
    tokens = clip.tokenizer(["a red circle", "a blue square", "a green star", "red", "blue"])
    owner = torch.tensor([0, 0, 1, 2, 3])
    losses = []
    for _ in range(5):
        inner = engine.unwrap(model)
        image_emb = inner.clip.encode_image(images.to(engine.device))
        with torch.no_grad():
            caption_emb = inner.clip.encode_text(tokens.to(engine.device))
        loss = 0.75 * arc_margin_loss(image_emb, labels, inner.proxies) + 0.25 * multi_caption_loss(
            image_emb, caption_emb, owner
        )
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    inner = engine.unwrap(model)
    gathered = gather_with_grad(torch.full((2, 1), float(engine.rank)))
    result = {
        "losses": losses,
        "text_identical": all(
            torch.equal(p, text_before[n]) for n, p in inner.named_parameters() if n in text_before
        ),
        "image_changed": not torch.equal(inner.clip.visual.conv1.weight.detach(), image_before),
        "proxies_sum": float(inner.proxies.detach().sum()),
        "gathered": gathered.flatten().tolist(),
        "world_size": engine.world_size,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{engine.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
