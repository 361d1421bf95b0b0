"""Benchmark: the MCIP training step against a plain CLIP step, the data loader's overhead, and
peak memory per rank under DeepSpeed ZeRO-0/1/2, all measured in this one run.

    .venv/bin/python benchmarks/train.py [--steps 20] [--batch 32]

(a) plain open_clip step: image + text forward, open_clip's ClipLoss, backward, AdamW, all trained;
(b) our MCIP step on the same model and batch: image tower trained, 5 captions per image embedded by
    the frozen text tower, 0.75 ArcMargin + 0.25 Multi-Caption ArcMargin. Target: (b) <= 1.5x (a).
(c) MCIP steps fed by our loader (image shards, 2 workers) vs the same steps on pre-loaded tensors,
    both after one warm-up step (the loader's worker start is paid once per epoch). Target: <= 10%.
(d) 2 processes on gloo with DeepSpeed ZeRO stage 0, 1, 2 (tests/helpers/engine_check.py): peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402

from examples import tiny_models  # noqa: E402
from stages.training.data import CaptionedImages, epoch_loader, index_samples, train_transform  # noqa: E402
from stages.training.losses import arc_margin_loss, multi_caption_loss  # noqa: E402
from stages.training.model import WithProxies, build_model, freeze_for_finetune  # noqa: E402
from tests.conftest import make_image_shards  # noqa: E402

CAPTIONS = 5


def timed_steps(step, batches, steps: int) -> float:
    step(batches[0])  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return (time.perf_counter() - start) / steps


def plain_clip_step(model, tokenizer):
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch):
        images, tokens = batch["image"], batch["tokens"][:, 0]
        image_features, text_features, scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def mcip_step(module: WithProxies):
    freeze_for_finetune(module.clip)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

    def step(batch):
        image_emb = module.clip.encode_image(batch["image"])
        mask = batch["mask"]
        owner = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
        with torch.no_grad():
            caption_emb = module.clip.encode_text(batch["tokens"][mask])
        loss = 0.75 * arc_margin_loss(image_emb, batch["cls"], module.proxies) + 0.25 * multi_caption_loss(
            image_emb, caption_emb, owner
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def dataset_for(work: Path, clip, batch: int) -> CaptionedImages:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = make_image_shards(work, shards=4, per_shard=batch * 8)
    for unit, unit_keys in enumerate(keys):
        path = work / "captions" / "bench" / f"{unit:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.table(
                {
                    "key": unit_keys,
                    "captions": [
                        [f"a red circle number {k} v{i}" for i in range(CAPTIONS)] for k in unit_keys
                    ],
                }
            ),
            path,
        )
    refs = index_samples(work, [f"{u:06d}" for u in range(4)], "bench")
    cfg = clip.model.visual.preprocess_cfg
    return CaptionedImages(
        refs, train_transform(clip.image_size, cfg["mean"], cfg["std"]), clip.tokenizer, CAPTIONS, 0
    )


def zero_memory(clip_files, stages=(0, 1, 2)) -> dict[int, list[float]]:
    arch, checkpoint, config_dir = clip_files
    peaks = {}
    for stage in stages:
        out = Path(tempfile.mkdtemp(prefix=f"zero{stage}-"))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                "29655",
                str(REPO / "tests" / "helpers" / "engine_check.py"),
                str(out),
                arch,
                str(checkpoint),
                str(config_dir),
                str(REPO / "launch" / "deepspeed" / f"zero{stage}.json"),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        peaks[stage] = [json.loads((out / f"rank{r}.json").read_text())["max_rss_mb"] for r in range(2)]
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--skip-zero", action="store_true")
    parser.add_argument("--workers", type=int, default=2, help="loader workers for (c)")
    parser.add_argument("--models", default="tiny,small")
    args = parser.parse_args()
    for size in args.models.split(","):
        measure(size, args)
    if not args.skip_zero:
        clip_files = tiny_models.save_tiny_clip(Path(tempfile.mkdtemp(prefix="bench-zero-")) / "clip")
        print("\npeak resident memory per rank, 2 processes on gloo (tiny model: mostly the runtime itself)")
        for stage, peaks in zero_memory(clip_files).items():
            print(f"ZeRO-{stage}: " + ", ".join(f"rank {r} {mb:.0f} MB" for r, mb in enumerate(peaks)))


def measure(size: str, args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if size == "tiny":
        clip_files = tiny_models.save_tiny_clip(work / "clip")
    else:
        clip_files = tiny_models.save_tiny_clip(
            work / "clip", name=tiny_models.SMALL_CLIP, config=tiny_models.small_clip_config()
        )
    clip = build_model(*clip_files)
    dataset = dataset_for(work / "run", clip, args.batch)
    preloaded = list(epoch_loader(dataset, 0, 0, 1, args.batch, args.batch, workers=0))[: args.steps]

    torch.manual_seed(0)
    plain = timed_steps(
        plain_clip_step(build_model(*clip_files).model, clip.tokenizer), preloaded, args.steps
    )
    module = WithProxies(build_model(*clip_files).model, classes=3)
    mcip = timed_steps(mcip_step(module), preloaded, args.steps)
    step = mcip_step(WithProxies(build_model(*clip_files).model, classes=3))
    batches = iter(epoch_loader(dataset, 0, 0, 1, args.batch, args.batch, workers=args.workers))
    step(next(batches))  # warm-up, as for the pre-loaded run: workers started, first batches queued
    start = time.perf_counter()
    for _ in range(args.steps):
        step(next(batches))
    with_loader = (time.perf_counter() - start) / args.steps
    on_tensors = timed_steps(step, preloaded, args.steps)

    print(
        f"\n{size} open_clip ViT ({clip_files[0]}), batch {args.batch}, "
        f"{CAPTIONS} captions per image, {torch.get_num_threads()} threads, {args.steps} steps"
    )
    print(f"{'variant':<44}{'ms/step':>9}{'ratio':>8}")
    print(f"{'(a) plain open_clip CLIP-loss step':<44}{plain * 1e3:>9.1f}{1.0:>8.2f}")
    print(
        f"{'(b) MCIP step (same model and batch)':<44}{mcip * 1e3:>9.1f}{mcip / plain:>8.2f}   target <= 1.5"
    )
    print(f"{'(c) MCIP steps on pre-loaded tensors':<44}{on_tensors * 1e3:>9.1f}{1.0:>8.2f}")
    label = f"(c) MCIP steps fed by our loader ({args.workers} workers)"
    print(
        f"{label:<44}{with_loader * 1e3:>9.1f}{with_loader / on_tensors:>8.2f}"
        f"   target <= 1.10 (samples/s {args.batch / with_loader:.0f} vs {args.batch / on_tensors:.0f})"
    )


if __name__ == "__main__":
    main()
