"""The built-in demo's manifest run end to end at a reduced size (`make demo` at full size).

Real parts throughout: the world's pictures served on 127.0.0.1 and downloaded by img2dataset, the
pre-trained world CLIP loaded from its checkpoint file, retrieval captions, MCIP fine-tuning,
re-alignment and the evaluate stage with its report and plots.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, cli_env, run_cli, snapshot

DEMO_YAML = REPO / "examples" / "demo.yaml"
SMALLER = {"finetune": {"epochs": 1, "max_steps": 4, "batch_size": 8, "checkpoint_every": 2},
           "realign": {"epochs": 1, "max_steps": 4, "batch_size": 8, "checkpoint_every": 2},
           "caption": {"batch_size": 32}}


def reduced_manifest(folder: Path, root: str = "run", shared: Path | None = None, **download) -> Path:
    """demo.yaml with its run root at `folder/root`, the world and models in `shared` (default: the
    run root, as in the demo), the training cut to a few steps, and download settings overridden."""
    shared = shared or folder / root
    text = DEMO_YAML.read_text().replace("root: ../runs/demo", f"root: {folder / root}")
    data = yaml.safe_load(text.replace("../runs/demo", str(shared)).replace("config_dir: ../", f"config_dir: {REPO}/"))
    for stage, values in SMALLER.items():
        data["stages"][stage].update(values)
    data["stages"]["download"].update(download)
    path = folder / f"{root}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_demo(manifest: Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "examples.demo", "--manifest", str(manifest), "--tiny-world",
               "--pretrain-steps", "40"]
    return subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)


def test_demo_end_to_end_at_reduced_size_then_a_no_op(tmp_path):
    manifest = reduced_manifest(tmp_path)
    first = run_demo(manifest, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    validate = run_cli("validate", str(manifest), cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr
    out = tmp_path / "run" / "evaluate" / "demo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["baseline", "mcip", "mcip+re-a"]
    for values in metrics.values():
        assert 0 < values["i2i_map"]["world"] <= 1 and 0 <= values["knn_top1"] <= 1
        assert set(values["zero_shot"]) == {"top1", "top5"} and values["zero_shot"]["top5"] >= values["zero_shot"]["top1"]
        assert set(values["text_to_image"]) == {"R@1", "R@5", "R@10", "mAP"}
    assert metrics["baseline"] != metrics["mcip"]  # the fine-tuned image tower embeds differently
    report = (out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in metrics)
    for plot in ("metrics.png", "retrieval_grid.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "report:" in first.stdout and "| mcip+re-a |" in first.stderr

    before = snapshot(tmp_path / "run")
    second = run_demo(manifest, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert snapshot(tmp_path / "run") == before  # nothing rewritten
    assert "| mcip+re-a |" in second.stderr  # the table is printed again
