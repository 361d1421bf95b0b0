"""Training across nodes and across a change of nodes (issue 22), on CPU with gloo and DeepSpeed ZeRO-2:
two torchrun agents (`--nnodes 2 --node_rank 0/1`) on 127.0.0.1 against one agent of 2 processes,
a kill -9 of one agent, and a checkpoint written by 2 processes resumed on 1 and then on 3 (the
global batch kept by gradient accumulation, the data position by samples seen)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.component.test_training import _images, _manifest
from tests.conftest import REPO, cli_env

ZERO2 = str(REPO / "launch" / "deepspeed" / "zero2.json")
SIGNALS = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # as launch/slurm_mcip.sh


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(
    manifest: Path, stage: str, nproc: int, port: int, nnodes: int = 1, node_rank: int = 0, log=None
):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node_rank={node_rank}",
    ]
    command += [f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}", SIGNALS]
    command += ["-m", "pipeline", "run", str(manifest), "--stage", stage]
    return subprocess.Popen(
        command,
        cwd=manifest.parent,
        env=cli_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=log if log is not None else subprocess.DEVNULL,
    )


def _ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _stop_after(meta: Path, agent: subprocess.Popen, log: Path) -> None:
    """SIGUSR1 (what SLURM sends before a time limit) once `meta` exists: the workers checkpoint and
    stop (the agent itself then ends with torchrun's SignalException, as under srun)."""
    deadline = time.monotonic() + 600
    while not meta.exists() and time.monotonic() < deadline and agent.poll() is None:
        time.sleep(0.01)
    os.killpg(agent.pid, signal.SIGUSR1)
    agent.wait(timeout=300)
    assert "written, stopping" in log.read_text(), log.read_text()[-3000:]


def test_two_then_one_then_three_processes_keep_the_global_batch_and_see_each_sample_once(
    tmp_path, tiny_models
):
    """24 images, batch 2 per process, global batch 12: 2 processes x 3 micro steps, 1 x 6, 3 x 2."""
    _images(tmp_path / "run", shards=3, per_shard=8)
    settings = {"deepspeed": ZERO2, "loss": "gpr", "batch_size": 2, "global_batch": 12, "epochs": 3}
    manifest = _manifest(
        tmp_path, tiny_models, finetune={**settings, "checkpoint_every": 1, "record_samples": True}
    )
    out = tmp_path / "run" / "finetune" / "mcip"
    logs = []
    for nproc, stop_at in ((2, 1), (1, 3), (3, None)):
        log = open(tmp_path / f"nproc{nproc}.log", "w")
        logs.append(tmp_path / f"nproc{nproc}.log")
        agent = _torchrun(manifest, "finetune", nproc, _free_port(), log=log)
        if stop_at is None:
            assert agent.wait(timeout=600) == 0, (tmp_path / f"nproc{nproc}.log").read_text()[-3000:]
        else:
            _stop_after(out / "ckpt" / f"step-{stop_at:08d}" / "meta.json", agent, logs[-1])
    text = [p.read_text() for p in logs]
    assert "written by 2 processes" in text[1] and "written by 1 process)" in text[2], text[2][-2000:]
    rows = _ledger(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for epoch in range(3):
        seen = [i for r in rows if r["epoch"] == epoch for i in r["indexes"]]
        assert sorted(seen) == list(range(24)), f"epoch {epoch}"  # every sample once, none twice
    done = json.loads((out / "_done" / "final.json").read_text())
    assert done["counts"] == {"steps": 6, "samples_seen": 72}


def test_optimizer_state_is_equal_after_conversion_to_one_and_three_processes(tmp_path):
    """Saved by 2 processes; loaded by 1 and by 3 (66 values: a partition of 22 each, 33 each before)."""
    check, folder = REPO / "tests" / "helpers" / "elastic_check.py", tmp_path / "ckpt"
    dumps = {}
    for nproc, mode in ((2, "save"), (1, "load"), (3, "load")):
        dumps[nproc] = tmp_path / f"{mode}{nproc}.pt"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        command += [f"--master_port={_free_port()}", str(check), mode, str(folder), ZERO2, str(dumps[nproc])]
        command += ["2"] if mode == "load" else []  # the number of processes that wrote it
        done = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(dumps[2])
    assert saved["steps"] == [3]
    for nproc in (1, 3):
        loaded = torch.load(dumps[nproc])
        assert loaded["world_size"] == nproc and loaded["steps"] == [3]
        for name, values in saved["params"].items():
            for key, tensor in values.items():
                assert torch.equal(loaded["params"][name][key], tensor), f"{name} {key} on {nproc} processes"
    assert (folder / "universal" / "pytorch_model" / "zero" / "optimizer_state.pt").is_file()
