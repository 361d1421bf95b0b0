"""A complete tiny run (download -> caption -> finetune -> realign -> evaluate) made once, and the
helpers the bad-input suite (tests/component/test_bad_inputs.py) applies to copies of it.

    made = make_complete_run(base, server)     # {"assets": ..., "made": folder with m.yaml and run/}

Everything a fingerprint names by path (the tiny model, its config folder, the caption bank, the
evaluation images and their files) lives in `assets/`, outside the copied folder, so a copy of
`made/` (mtimes kept) is as complete as the original: rerunning any stage there does nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import write_url_table

ROWS = 6  # two image shards of three
EVAL_CLASSES = ("red", "green", "blue")
EVAL_PER_CLASS = 2
BANK = ["a red square", "a green circle", "a blue shape", "a small photo", "a dark object", "a light star"]


def make_assets(folder: Path) -> dict[str, Any]:
    """The tiny CLIP, the caption bank, an evaluation image folder with class names and a
    Karpathy-split caption file."""
    from examples import tiny_models
    from examples.image_server import generated_jpeg

    folder.mkdir(parents=True, exist_ok=True)
    arch, checkpoint, config_dir = tiny_models.save_tiny_clip(folder / "clip")
    (folder / "bank.txt").write_text("\n".join(BANK) + "\n")
    images = folder / "eval"
    entries = []
    for c, name in enumerate(EVAL_CLASSES):
        (images / name).mkdir(parents=True)
        for k in range(EVAL_PER_CLASS):
            (images / name / f"{k}.jpg").write_bytes(generated_jpeg(100 + c * EVAL_PER_CLASS + k))
            entries.append(
                {
                    "filepath": name,
                    "filename": f"{k}.jpg",
                    "split": "test",
                    "sentences": [{"raw": f"a {name}"}],
                }
            )
    class_names = folder / "class_names.json"
    class_names.write_text(json.dumps({name: f"{name} thing" for name in EVAL_CLASSES}))
    karpathy = images / "captions.json"
    karpathy.write_text(json.dumps({"images": entries}))
    return {
        "arch": arch,
        "checkpoint": checkpoint,
        "config_dir": config_dir,
        "bank": folder / "bank.txt",
        "eval": images,
        "class_names": class_names,
        "karpathy": karpathy,
    }


def manifest_data(assets: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the complete run; paths of the copied folder are relative (`urls.parquet`,
    `run`), the assets' absolute."""
    clip = {"model": assets["arch"], "config_dir": str(assets["config_dir"])}

    def folder_images() -> dict[str, str]:  # one dict per use: YAML anchors would tie them together
        return {"layout": "folder", "path": str(assets["eval"])}

    return {
        "run": {"root": "run", "seed": 0},
        "stages": {
            "download": {
                "url_list": "urls.parquet",
                "caption_col": "caption",
                "label_col": "label",
                "samples_per_shard": ROWS // 2,
                "processes": 1,
                "threads": 4,
                "image_size": 32,
            },
            "caption": {
                "backend": "retrieval",
                "model": assets["arch"],
                "captions_per_image": 3,
                "batch_size": 4,
                "num_workers": 0,
                "retrieval": {
                    "bank": str(assets["bank"]),
                    "pretrained": str(assets["checkpoint"]),
                    "config_dir": str(assets["config_dir"]),
                    "threshold": -1.0,
                },
            },
            "finetune": {
                **clip,
                "pretrained": str(assets["checkpoint"]),
                "loss": "mcip",
                "captions": "retrieval",
                "captions_per_image": 3,
                "epochs": 1,
                "batch_size": 2,
                "lr": 1.0e-3,
                "checkpoint_every": 100,
                "num_workers": 0,
            },
            "realign": {
                "unlocked_layers": 1,
                "max_steps": 2,
                "batch_size": 2,
                "lr": 1.0e-3,
                "checkpoint_every": 100,
                "embed_batch_size": 4,
                "num_workers": 0,
            },
            "evaluate": {
                **clip,
                "models": [
                    {"name": "base", "checkpoint": str(assets["checkpoint"])},
                    {"name": "ft", "stage": "finetune/mcip"},
                    {"name": "ra", "stage": "realign/mcip"},
                ],
                "retrieval": {"world": folder_images()},
                "knn": {"data": folder_images(), "k": 3},
                "zero_shot": {"data": folder_images(), "class_names": str(assets["class_names"])},
                "text_to_image": {"layout": "karpathy", "path": str(assets["karpathy"])},
                "batch_size": 4,
                "num_workers": 0,
            },
        },
    }


def write_manifest(folder: Path, data: dict[str, Any], name: str = "m.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_complete_run(base: Path, server) -> dict[str, Any]:
    """`base/assets/` and `base/made/` (m.yaml, urls.parquet, run/ with every stage complete)."""
    from pipeline.cli import main as cli

    assets = make_assets(base / "assets")
    made = base / "made"
    made.mkdir()
    urls = [server.url(f"/img/{i}.jpg") for i in range(ROWS)]
    write_url_table(
        made / "urls.parquet", urls, [f"alt {i}" for i in range(ROWS)], [i % 3 for i in range(ROWS)]
    )
    data = manifest_data(assets)
    manifest = write_manifest(made, data)
    code = cli(["run", str(manifest)])
    if code != 0:
        raise RuntimeError(f"the complete run failed with exit code {code}")
    return {"assets": assets, "made": made, "data": data}


def changed(data: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """`data` with `change` merged in: `{"stages.caption.retrieval.threshold": 2}` sets that key,
    a value `DELETE` removes it."""
    out = copy.deepcopy(data)
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return out


DELETE = object()


def digests(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `root`, except logs/ (runs.jsonl, locks) and `skip`."""
    skipped = {Path(p).resolve() for p in skip}
    out = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.relative_to(root).parts[0] == "logs" or path.resolve() in skipped:
            continue
        out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def copy_made(made: Path, to: Path) -> Path:
    """A copy of the complete run folder, mtimes kept (so the quick checks stay quick)."""
    shutil.copytree(made, to, symlinks=True)
    return to
