"""Benchmark: the architectures the README names, at their real sizes with random weights, through the
real stages: 2 finetune (MCIP) steps, 1 realign step and evaluate's image embedding, per model.

    .venv/bin/python benchmarks/real_models.py [--models ViT-B-32,ViT-L-14-336,ViT-SO400M-14-SigLIP-384]
    .venv/bin/python benchmarks/real_models.py --device cuda      # a GPU node: bf16 under DeepSpeed ZeRO-2

Each model runs in its own process (so its peak RSS is its own) on a run root of labelled image shards:
caption (alt text) -> finetune -> realign -> evaluate (i2i on the shards). SigLIP's tokenizer is a hub
download, so its config is registered again with a local word-level tokenizer folder (same vocabulary
size and context length). A model whose estimated training memory exceeds what this machine has free is
skipped and the table says so. Prints one table: finetune step time and samples/s, realign step time,
evaluate images/s, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("ViT-B-32", "ViT-L-14-336", "ViT-SO400M-14-SigLIP-384")
PARAMS_M = {"ViT-B-32": 151, "ViT-L-14-336": 428, "ViT-SO400M-14-SigLIP-384": 878}  # for the memory estimate
SIGLIP = "ViT-SO400M-14-SigLIP-384"


def _siglip_configs(folder: Path) -> Path:
    """A config folder where SigLIP's architecture reads its tokenizer from a local folder."""
    import open_clip
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "a an the photo of picture image with on in and red green blue small large".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder / "siglip-tokenizer")
    config = open_clip.get_model_config(SIGLIP)
    config["text_cfg"]["hf_tokenizer_name"] = str(folder / "siglip-tokenizer")
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "configs" / f"{SIGLIP}.json").write_text(json.dumps(config))
    return folder / "configs"


def _manifest(root: Path, model: str, config_dir: Path | None, device: str, batch: int) -> Path:
    import yaml

    common = {"model": model, "device": device, "num_workers": 0}
    if config_dir is not None:
        common["config_dir"] = str(config_dir)
    training = {"deepspeed": str(REPO / "launch" / "deepspeed" / "zero2.json")} if device == "cuda" else {}
    stages = {
        "caption": {"backend": "alt_text", "num_workers": 0},
        "finetune": {
            **common,
            **training,
            "captions": "alt_text",
            "batch_size": batch,
            "captions_per_image": 1,
            "max_steps": 2,
            "checkpoint_every": 1000,
        },
        "realign": {
            **{k: v for k, v in common.items() if k != "model"},
            **training,
            "batch_size": batch,
            "max_steps": 1,
            "checkpoint_every": 1000,
        },
        "evaluate": {
            **common,
            "batch_size": batch,
            "models": [{"name": "realigned", "stage": "realign/mcip"}],
            "retrieval": {"shards": {"layout": "shards"}},
        },
    }
    path = root / "bench.yaml"
    path.write_text(yaml.safe_dump({"run": {"root": str(root / "run"), "seed": 0}, "stages": stages}))
    return path


def _steps(metrics: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]


def run_one(model: str, device: str, batch: int, images: int) -> dict:
    """In this process: shards, then the four stages through the CLI; timings and peak RSS."""
    from pipeline.cli import main as cli
    from tests.conftest import make_image_shards

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_image_shards(root / "run", shards=2, per_shard=images // 2)
        (root / "run" / "images" / "labels.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
        config_dir = _siglip_configs(root) if model == SIGLIP else None
        manifest = _manifest(root, model, config_dir, device, batch)
        seconds = {}
        for stage in ("caption", "finetune", "realign", "evaluate"):
            started = time.perf_counter()
            if cli(["run", str(manifest), "--stage", stage]) != 0:
                raise SystemExit(f"{model}: stage {stage} failed")
            seconds[stage] = time.perf_counter() - started
        finetune = _steps(root / "run" / "finetune" / "mcip" / "metrics.jsonl")
        realign = _steps(root / "run" / "realign" / "mcip" / "metrics.jsonl")
    return {
        "finetune_step_s": finetune[-1],
        "realign_step_s": realign[-1],
        "evaluate_images_per_s": images / seconds["evaluate"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def _estimate_gib(model: str, batch: int) -> float:
    """fp32 weights of the whole model + grads and two AdamW moments of the image tower (about half),
    plus activations, which the batch dominates on CPU: a rough figure, erring high."""
    params = PARAMS_M[model] * 1e6
    return (params * 4 + params / 2 * 12) / 2**30 + 1.5 * batch


def _row(model: str, args) -> str:
    need = _estimate_gib(model, args.batch)
    if args.device == "cpu" and need > _available_gib():
        return f"{model:<26} skipped: needs ~{need:.0f} GiB, {_available_gib():.0f} GiB free"
    command = [
        sys.executable,
        __file__,
        "--one",
        model,
        "--device",
        args.device,
        "--batch",
        str(args.batch),
        "--images",
        str(args.images),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    if done.returncode != 0:
        return f"{model:<26} failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:80]}"
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return (
        f"{model:<26}{r['finetune_step_s']:>10.2f}{args.batch / r['finetune_step_s']:>10.2f}"
        f"{r['realign_step_s']:>10.2f}{r['evaluate_images_per_s']:>11.2f}{r['peak_rss_gib']:>10.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="per step (default 4 on cpu, 32 on cuda)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one model in this process
    args = parser.parse_args()
    args.batch = args.batch or (4 if args.device == "cpu" else 32)
    args.images = max(args.images, 2 * args.batch)
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.batch, args.images)))
        return
    print(
        f"real architectures, random weights, {args.device}, batch {args.batch}, {args.images} images "
        f"(2 finetune steps, 1 realign step, evaluate embedding)"
    )
    print(
        f"{'model':<26}{'ft step s':>10}{'ft img/s':>10}{'ra step s':>10}{'eval img/s':>11}{'peak GiB':>10}"
    )
    for model in args.models.split(","):
        print(_row(model, args), flush=True)


if __name__ == "__main__":
    main()
