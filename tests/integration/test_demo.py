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

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import REPO, cli_env, run_cli, snapshot

DEMO_YAML = REPO / "examples" / "demo.yaml"
SMALLER = {
    "finetune": {"epochs": 1, "max_steps": 4, "batch_size": 8, "checkpoint_every": 2},
    "realign": {"epochs": 1, "max_steps": 4, "batch_size": 8, "checkpoint_every": 2},
    "caption": {"batch_size": 32},
}


def reduced_manifest(folder: Path, root: str = "run", shared: Path | None = None, **download) -> Path:
    """demo.yaml with its run root at `folder/root`, the world and models in `shared` (default: the
    run root, as in the demo), the training cut to a few steps, and download settings overridden."""
    shared = shared or folder / root
    text = DEMO_YAML.read_text().replace("root: ../runs/demo", f"root: {folder / root}")
    data = yaml.safe_load(
        text.replace("../runs/demo", str(shared))
        .replace("config_dir: ../", f"config_dir: {REPO}/")
        .replace("deepspeed: ../", f"deepspeed: {REPO}/")
    )
    for stage, values in SMALLER.items():
        data["stages"][stage].update(values)
    data["stages"]["download"].update(download)
    path = folder / f"{root}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_demo(manifest: Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "examples.demo",
        "--manifest",
        str(manifest),
        "--tiny-world",
        "--pretrain-steps",
        "40",
    ]
    return subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The reduced demo, run once for this module: (folder, manifest, the first run's result)."""
    folder = tmp_path_factory.mktemp("demo")
    manifest = reduced_manifest(folder)
    return folder, manifest, run_demo(manifest, folder)


def test_demo_end_to_end_at_reduced_size_then_a_no_op(demo_run):
    tmp_path, manifest, first = demo_run
    assert first.returncode == 0, first.stderr[-3000:]
    validate = run_cli("validate", str(manifest), cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr
    out = tmp_path / "run" / "evaluate" / "demo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["baseline", "mcip", "mcip+re-a"]
    for values in metrics.values():
        assert 0 < values["i2i_map"]["world"] <= 1 and 0 <= values["knn_top1"] <= 1
        assert (
            set(values["zero_shot"]) == {"top1", "top5"}
            and values["zero_shot"]["top5"] >= values["zero_shot"]["top1"]
        )
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


def test_a_wheel_install_validates_and_evaluates_the_demo(demo_run, tmp_path):
    """`pip install` of the built wheel (not the editable checkout) runs `mcip validate` and evaluate:
    every package is in the wheel. The fresh venv borrows only the third-party packages of ours."""
    folder, manifest, first = demo_run
    assert first.returncode == 0, first.stderr[-3000:]
    wheel_dir, venv = tmp_path / "wheel", tmp_path / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "third_party.pth").write_text(
        f"{deps}\n"
    )  # a path line: that folder's own .pth files stay unread
    wheel = next(wheel_dir.glob("mcip_pipeline-*.whl"))
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )

    data = yaml.safe_load(manifest.read_text())
    data["stages"]["evaluate"]["name"] = "from-wheel"
    wheel_manifest = tmp_path / "wheel.yaml"
    wheel_manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {k: v for k, v in cli_env(OMP_NUM_THREADS="2").items() if k != "PYTHONPATH"}  # none of the checkout
    mcip = str(venv / "bin" / "mcip")
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import stages; print(stages.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout
    validate = subprocess.run(
        [mcip, "validate", str(wheel_manifest)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        validate.returncode == 0
        and "ok (stages: download, caption, finetune, realign, evaluate, index)" in validate.stdout
    ), validate.stderr[-2000:]
    evaluate = subprocess.run(
        [mcip, "run", str(wheel_manifest), "--stage", "evaluate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    ours = json.loads((folder / "run" / "evaluate" / "from-wheel" / "metrics.json").read_text())
    assert ours == json.loads((folder / "run" / "evaluate" / "demo" / "metrics.json").read_text())


def own_instance_hits(vectors: np.ndarray, instances: list[str], k: int = 10) -> int:
    """Over every picture as a query (itself included): results of its own instance in its top k."""
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    top = np.argsort(-(vectors @ vectors.T), axis=1, kind="stable")[:, :k]
    labels = np.array(instances)
    return int((labels[top] == labels[:, None]).sum())


def test_demo_indexes_the_evaluation_split_and_serves_both_indexes(demo_run):
    """The index stage ran in the demo (baseline and MCIP over the evaluation split); every picture
    queried through the HTTP API: the own-instance count of each index's top 10 is the one the demo
    printed (through stages/index/search.py) and the one the evaluate stage's embeddings of the same
    pictures give, and where evaluate's i2i mAP shows a clear difference between the models, the
    index shows it the same way.

    The full demo shows the gain (`make demo`, 2026-12-03: baseline 4189, mcip 4787 over 768
    queries; i2i mAP 69.8 -> 79.3). This reduced one (tiny world, 40 pre-training steps, 4 finetune
    steps of 8) does not, and a few more steps do not make it (measured 2026-12-03): over its 64
    queries (at most 256 hits) the baseline has 203; MCIP after 4 steps of 8 has 200 (i2i mAP 66.6
    -> 66.2), after a whole epoch (8 steps of 8) 198 (64.7; lr 3e-4: 201), after 2, 6 and 12 steps
    of 32 204, 198 and 204 (67.6, 66.4, 66.2): noise around the baseline (16 fine-tuning instances
    of 4 pictures), though 12 steps of 32 would cost only 8 s more (finetune 34 s against 26 s, on
    a loaded machine). So the gain is asserted only where evaluate's mAP shows one."""
    from examples.world_shards import instance_of
    from pipeline.manifest import load_manifest
    from stages.evaluate.datasets import image_folder
    from stages.index.search import open_indexes
    from stages.index.serve import make_app, running

    folder, manifest, first = demo_run
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"python -m pipeline serve {manifest} --index baseline --index mcip" in first.stdout
    indexes = open_indexes(load_manifest(manifest), ["baseline", "mcip"])
    keys = indexes["baseline"].meta.column("key").to_pylist()
    hits = {"baseline": 0, "mcip": 0}
    with running(make_app(indexes)) as url, httpx.Client(base_url=url, timeout=120) as client:
        for key in keys:
            results = client.get("/api/search", params={"key": key, "k": 10}).json()["results"]
            for name in hits:
                hits[name] += sum(instance_of(hit["key"]) == instance_of(key) for hit in results[name])
    world = folder / "run" / "world" / "eval"
    instances = list(image_folder(world).labels)
    assert sorted(instances) == sorted(instance_of(k) for k in keys) and len(keys) == 64
    cache = folder / "run" / "evaluate" / "demo" / "embeddings"
    expected = {
        name: own_instance_hits(np.load(next((cache / model).glob("*.npy"))), instances)
        for name, model in (("baseline", "baseline"), ("mcip", "mcip+re-a"))
    }
    assert all(abs(hits[n] - expected[n]) <= 2 for n in hits), (hits, expected)
    printed = (
        f"own-instance results in top 10 over 64 queries: baseline {hits['baseline']}, mcip {hits['mcip']}"
    )
    assert printed in first.stdout, first.stdout[-2000:]
    metrics = json.loads((folder / "run" / "evaluate" / "demo" / "metrics.json").read_text())
    gain = metrics["mcip+re-a"]["i2i_map"]["world"] - metrics["baseline"]["i2i_map"]["world"]
    if abs(gain) > 0.02:  # the full demo: +9.5 points; the reduced one here: within noise (docstring)
        assert (hits["mcip"] > hits["baseline"]) == (gain > 0), (hits, gain)
