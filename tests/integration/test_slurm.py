"""launch/slurm_mcip.sh and `submit` against a real one-node SLURM (slurm-wlm + munge on localhost).

Skipped, with the reason, only where SLURM cannot be installed or started (no root, no apt).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from examples.image_server import ImageServer
from shards.tars import read_tar_samples
from tests.conftest import REPO, cli_env, make_image_shards, run_cli
from tests.integration.test_demo import reduced_manifest
from tests.slurm.cluster import Cluster, wait_until

LAUNCHER = REPO / "launch" / "slurm_mcip.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("slurm-local"))
    reason = cluster.start()
    if reason:
        pytest.skip(f"SLURM tests skipped: {reason}")
    yield cluster
    cluster.stop()


def job_env(**extra: str) -> dict[str, str]:
    return cli_env(MCIP_PYTHON=sys.executable, OMP_NUM_THREADS="2", **extra)


def sbatch(cluster: Cluster, *args: str, cwd: Path) -> str:
    done = cluster.run("sbatch", "--parsable", f"--chdir={cwd}", *args, env=job_env())
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def final_state(root: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(root / stage / "mcip" / "final" / "model.pt")["state_dict"]


def same_models(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def images_of(root: Path) -> dict[str, tuple]:
    """key -> (sha256 of the jpg, class, alt text), over every image shard."""
    found = {}
    for tar in sorted((root / "images").glob("*.tar")):
        for key, sample in read_tar_samples(tar).items():
            found[key] = (hashlib.sha256(sample["jpg"]).hexdigest(), sample.get("cls"), sample.get("txt"))
    return found


def captions_of(root: Path, tag: str) -> list:
    return [pq.read_table(p).to_pylist() for p in sorted((root / "captions" / tag).glob("*.parquet"))]


def texts_of(shards: list) -> list:
    return [[(row["key"], row["captions"]) for row in rows] for rows in shards]


def scores_of(shards: list) -> np.ndarray:
    return np.array([score for rows in shards for row in rows for score in row["scores"]])


# --- the whole demo pipeline in one allocation, 2 tasks ------------------------------------------


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    from examples.demo import prepare
    from examples.world import WorldSize

    folder = tmp_path_factory.mktemp("slurm-demo")
    port = prepare(folder / "shared", WorldSize.tiny(), pretrain_steps=40)
    with ImageServer(port, folder=folder / "shared" / "world"):
        yield folder


def demo_manifest(folder: Path, root: str) -> Path:
    return reduced_manifest(folder, root, folder / "shared", samples_per_shard=16)  # 4 shards for 2 tasks


def test_sbatch_runs_every_stage_like_the_local_run(cluster, demo_world):
    local = run_cli("run", str(demo_manifest(demo_world, "local")), cwd=demo_world, OMP_NUM_THREADS="2")
    assert local.returncode == 0, local.stderr[-2000:]
    job = sbatch(
        cluster,
        "--ntasks=2",
        f"--output={demo_world}/job-%j.out",
        str(LAUNCHER),
        str(demo_manifest(demo_world, "slurm")),
        cwd=demo_world,
    )
    fields = cluster.wait_final(job, job_env())
    assert fields["JobState"] == "COMPLETED", (demo_world / f"job-{job}.out").read_text()[-3000:]
    a, b = demo_world / "local", demo_world / "slurm"
    assert images_of(a) == images_of(b) and len(images_of(a)) == 64  # same keys, pictures, labels
    # same captions; scores equal up to float rounding (a task's batches mix other shards than one process's)
    assert texts_of(captions_of(a, "retrieval")) == texts_of(captions_of(b, "retrieval"))
    assert np.allclose(
        scores_of(captions_of(a, "retrieval")), scores_of(captions_of(b, "retrieval")), atol=1e-5
    )
    assert same_models(final_state(a, "finetune"), final_state(b, "finetune"))
    assert same_models(final_state(a, "realign"), final_state(b, "realign"))
    assert json.loads((a / "evaluate/demo/metrics.json").read_text()) == json.loads(
        (b / "evaluate/demo/metrics.json").read_text()
    )
    # the 2 tasks split the 4 download shards: each did 2, none twice
    runs = [json.loads(line) for line in (b / "logs" / "runs.jsonl").read_text().splitlines()]
    download = [r for r in runs if r["stage"] == "download"]
    assert sorted((r["rank"], r["world"], r["units_run"]) for r in download) == [(0, 2, 2), (1, 2, 2)]
    assert all(Path(r["log"]).exists() for r in download)


# --- requeue mid-stage through `submit`, and the requeue cap --------------------------------------


def requeue_manifest(folder: Path, root: str, tiny_models: dict, max_requeues: int = 2) -> Path:
    clip = {"model": tiny_models["clip_arch"], "config_dir": str(tiny_models["clip_configs"])}
    data = {
        "run": {"root": str(folder / root), "seed": 0},
        "stages": {
            "caption": {
                "backend": "blip",
                "model": str(tiny_models["blip"]),
                "generation": {"decoding": "beam"},
                "captions_per_image": 2,
                "batch_size": 2,
                "num_workers": 0,
            },
            "finetune": {
                "name": "mcip",
                **clip,
                "pretrained": str(tiny_models["clip_checkpoint"]),
                "loss": "gpr",
                "epochs": 10,
                "max_steps": 120,
                "batch_size": 4,
                "lr": 1.0e-4,
                "checkpoint_every": 10,
                "num_workers": 0,
            },
        },
        "slurm": {"default": {"max_requeues": max_requeues, "signal_lead": 60, "cpus_per_task": 2}},
    }
    path = folder / f"{root}.yaml"
    path.write_text(yaml.safe_dump(data))
    make_image_shards(folder / root, shards=8, per_shard=6)
    (folder / root / "images" / "labels.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
    return path


def test_submit_requeues_mid_caption_and_mid_training_and_resumes(cluster, tmp_path, tiny_models):
    local = run_cli(
        "run", str(requeue_manifest(tmp_path, "local", tiny_models)), cwd=tmp_path, OMP_NUM_THREADS="2"
    )
    assert local.returncode == 0, local.stderr[-2000:]
    manifest = requeue_manifest(tmp_path, "slurm", tiny_models)
    submitted = subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", str(manifest)],
        cwd=tmp_path,
        env=job_env(SLURM_CONF=cluster.conf),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    jobs = {line.split(":")[0]: line.split()[-1] for line in submitted.stdout.splitlines()}
    root = tmp_path / "slurm"

    captions_done = lambda: len(list((root / "captions" / "blip" / "_done").glob("*.json")))  # noqa: E731
    wait_until(
        lambda: captions_done() >= 1,
        what="a first caption shard",
        gave_up=cluster.ended(jobs["caption"], job_env()),
    )
    cluster.signal_batch(jobs["caption"], job_env())
    running = run_cli("status", str(manifest), cwd=tmp_path, SLURM_CONF=cluster.conf)
    assert f"job {jobs['finetune']} PENDING" in running.stdout  # waits for the caption job (afterok)
    wait_until(
        lambda: any((root / "finetune" / "mcip" / "ckpt").glob("step-*/meta.json")),
        what="a checkpoint",
        gave_up=cluster.ended(jobs["finetune"], job_env()),
    )
    cluster.signal_batch(jobs["finetune"], job_env())

    for stage in ("caption", "finetune"):
        fields = cluster.wait_final(jobs[stage], job_env())
        log = "".join(p.read_text() for p in (root / "logs" / stage).glob("slurm-*.out"))
        assert fields["JobState"] == "COMPLETED", log[-3000:]
        assert fields["Restarts"] == "1" and "requeueing (restart 1 of at most 2)" in log
    assert captions_of(tmp_path / "local", "blip") == captions_of(root, "blip")
    assert same_models(final_state(tmp_path / "local", "finetune"), final_state(root, "finetune"))
    metrics = [
        json.loads(line) for line in (root / "finetune" / "mcip" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == list(range(1, 121))  # appended across the requeue, no step twice

    status = run_cli("status", str(manifest), cwd=tmp_path, SLURM_CONF=cluster.conf)
    assert "caption: 8/8 units done" in status.stdout and "samples/s" in status.stdout


def test_requeue_cap_from_slurm_restart_count(cluster, tmp_path, tiny_models):
    manifest = requeue_manifest(tmp_path, "capped", tiny_models, max_requeues=0)
    data = yaml.safe_load(manifest.read_text())
    del data["stages"]["caption"]
    manifest.write_text(yaml.safe_dump(data))
    job = sbatch(
        cluster,
        f"--output={tmp_path}/job-%j.out",
        "--export=ALL,MCIP_MAX_REQUEUES=0",
        str(LAUNCHER),
        str(manifest),
        cwd=tmp_path,
    )
    wait_until(
        lambda: any((tmp_path / "capped" / "finetune" / "mcip" / "ckpt").glob("step-*/meta.json")),
        what="a checkpoint",
        gave_up=cluster.ended(job, job_env()),
    )
    cluster.signal_batch(job, job_env())
    fields = cluster.wait_final(job, job_env())
    out = (tmp_path / f"job-{job}.out").read_text()
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", out[-2000:]
    assert "requeue cap reached (SLURM_RESTART_COUNT=0, max_requeues=0)" in out
    assert any((tmp_path / "capped" / "finetune" / "mcip" / "ckpt").glob("step-*/meta.json"))  # work kept
    assert not (tmp_path / "capped" / "finetune" / "mcip" / "final" / "model.pt").exists()


@pytest.fixture
def two_nodes(cluster):
    """The module's cluster with a second node on this host (a slurmd of its own); left with two."""
    reason = cluster.start(nodes=2)
    if reason:
        pytest.skip(f"two SLURM nodes on this host: {reason}")
    return cluster


def test_training_on_two_nodes_then_requeued_onto_one(two_nodes, tmp_path, tiny_models):
    """srun starts one torchrun per node of a 2-node allocation (rendezvous on the first node's
    NodeAddr); requeued after USR1 onto 1 node, the job resumes the 2-process checkpoint with the same
    global batch (1 process x 2 accumulation steps) and sees every sample of each epoch once."""
    cluster = two_nodes
    root = tmp_path / "two"
    make_image_shards(root, shards=4, per_shard=8)
    (root / "images" / "labels.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
    finetune = {
        "model": tiny_models["clip_arch"],
        "pretrained": str(tiny_models["clip_checkpoint"]),
        "config_dir": str(tiny_models["clip_configs"]),
        "loss": "gpr",
        "batch_size": 4,
        "epochs": 8,
        "lr": 1.0e-4,
        "checkpoint_every": 2,
        "num_workers": 0,
        "record_samples": True,
        "deepspeed": str(REPO / "launch" / "deepspeed" / "zero2.json"),
    }
    manifest = tmp_path / "two.yaml"
    manifest.write_text(yaml.safe_dump({"run": {"root": "two", "seed": 0}, "stages": {"finetune": finetune}}))
    job = sbatch(
        cluster,
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        f"--output={tmp_path}/job-%j.out",
        "--export=ALL,MCIP_MAX_REQUEUES=1,MCIP_NPROC_PER_NODE=1",
        str(LAUNCHER),
        str(manifest),
        "--stage",
        "finetune",
        cwd=tmp_path,
    )
    out = root / "finetune" / "mcip"
    wait_until(  # DeepSpeed's start on 2 busy cores can take minutes
        lambda: any((out / "ckpt").glob("step-*/meta.json")),
        timeout=600,
        what="a checkpoint",
        gave_up=cluster.ended(job, job_env()),
    )
    cluster.signal_batch(job, job_env())
    wait_until(
        lambda: (
            cluster.job(job, job_env()).get("Restarts") == "1"
            and cluster.job(job, job_env()).get("JobState") == "PENDING"
        ),
        what="the requeued job pending",
        gave_up=cluster.ended(job, job_env()),
    )
    shrunk = cluster.run("scontrol", "update", f"JobId={job}", "NumNodes=1-1", "NumTasks=1", env=job_env())
    assert shrunk.returncode == 0, shrunk.stderr  # what a lost node leaves: one node, one task
    fields = cluster.wait_final(job, job_env(), timeout=600)
    log = (tmp_path / f"job-{job}.out").read_text()
    task_logs = {p.name: p.read_text() for p in (root / "logs" / "finetune").glob(f"{job}-node*.log")}
    assert fields["JobState"] == "COMPLETED" and fields["NumNodes"] == "1", log[-3000:]
    assert set(task_logs) == {f"{job}-node0.log", f"{job}-node1.log"}, task_logs.keys()
    assert (
        "[finetune 0/2]" in task_logs[f"{job}-node0.log"]
        and "[finetune 1/2]" in task_logs[f"{job}-node1.log"]
    )
    assert "written by 2 processes" in task_logs[f"{job}-node0.log"]  # the 1-node restart appends here
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 33))  # 32 images / global batch 8 x 8 epochs
    for epoch in range(8):
        assert sorted(i for r in rows if r["epoch"] == epoch for i in r["indexes"]) == list(range(32))
    newest = max((out / "ckpt").glob("step-*/meta.json"))
    assert json.loads(newest.read_text())["world_size"] == 1 and (out / "final" / "model.pt").is_file()
