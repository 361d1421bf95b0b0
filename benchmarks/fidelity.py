"""The paper's Table 1 in miniature, on the synthetic world (examples/world.py).

    .venv/bin/python benchmarks/fidelity.py [--seeds 0 1] [--out runs/fidelity]

Per seed: a world and its pre-trained CLIP (examples/demo.py `prepare`), then the real pipeline:
download -> caption (retrieval) -> finetune `gpr` (ArcMargin only) and `mcip` -> realign both ->
evaluate five models: baseline, GPR-FT, 2SFT (GPR-FT + re-alignment), MCIP, MCIP + Re-A.
Prints one table (mean over seeds, +- half the min-max spread) of i2i mAP, k-NN top-1, zero-shot top-1,
text-to-image R@1/R@5 and mAP, and writes it to `<out>/table.md`. Seeds and thread count are fixed;
finished stages are reused, so a second run only prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.demo import THREADS, prepare  # noqa: E402
from examples.image_server import ImageServer  # noqa: E402
from pipeline.cli import main as pipeline_main  # noqa: E402

MODELS = {
    "baseline": None,
    "GPR-FT": "finetune/gpr",
    "2SFT": "realign/gpr",
    "MCIP": "finetune/mcip",
    "MCIP+Re-A": "realign/mcip",
}
COLUMNS = {
    "i2i mAP": ("i2i_map", "world"),
    "k-NN top-1": ("knn_top1",),
    "zero-shot top-1": ("zero_shot", "top1"),
    "T2I R@1": ("text_to_image", "R@1"),
    "T2I R@5": ("text_to_image", "R@5"),
    "T2I mAP": ("text_to_image", "mAP"),
}


def manifests(root: Path) -> list[dict]:
    """Two manifests over one run root: the GPR variant, then MCIP with the evaluation of all five."""
    models = root / "models"
    clip = {"model": "mcip-world-rn", "config_dir": str(models / "open_clip_configs")}
    base = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text().replace("../runs/demo", str(root)))
    stages = base["stages"]
    stages["finetune"].update(clip)
    gpr = {
        "run": base["run"],
        "stages": {
            "download": stages["download"],
            "caption": stages["caption"],
            "finetune": {**stages["finetune"], "name": "gpr", "loss": "gpr", "captions": None},
            "realign": {**stages["realign"], "name": "gpr", **clip},
        },
    }
    evaluate = {
        **stages["evaluate"],
        "name": "fidelity",
        **clip,
        "models": [
            {"name": name, "stage": stage}
            if stage
            else {"name": name, "checkpoint": str(models / "mcip-world-rn.pt")}
            for name, stage in MODELS.items()
        ],
    }
    mcip = {
        "run": base["run"],
        "stages": {
            **gpr["stages"],
            "finetune": stages["finetune"],
            "realign": {**stages["realign"], **clip},
            "evaluate": evaluate,
        },
    }
    return [gpr, mcip]


def run_seed(out: Path, seed: int, pretrain_steps: int) -> dict:
    root = out / f"seed-{seed}"
    port = prepare(root, pretrain_steps=pretrain_steps, seed=seed)
    with ImageServer(port, folder=root / "world"):
        for number, manifest in enumerate(manifests(root)):
            manifest["run"]["seed"] = seed
            path = root / f"manifest-{number}.yaml"
            path.write_text(yaml.safe_dump(manifest, sort_keys=False))
            if pipeline_main(["run", str(path)]) != 0:
                raise SystemExit(f"fidelity: the pipeline failed on {path}")
    return json.loads((root / "evaluate" / "fidelity" / "metrics.json").read_text())


def value(metrics: dict, path: tuple[str, ...]) -> float:
    for key in path:
        metrics = metrics[key]
    return 100 * float(metrics)


def table(per_seed: dict[int, dict]) -> str:
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for model in MODELS:
        cells = []
        for path in COLUMNS.values():
            values = np.array([value(m[model], path) for m in per_seed.values()])
            cells.append(f"{values.mean():.1f} ± {(values.max() - values.min()) / 2:.1f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fidelity")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    per_seed = {seed: run_seed(args.out, seed, args.pretrain_steps) for seed in args.seeds}
    text = (
        f"Seeds {', '.join(map(str, args.seeds))}: mean ± half the spread, in percent.\n\n"
        + table(per_seed)
        + "\n"
    )
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
