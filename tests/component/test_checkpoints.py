"""Training checkpoints that lose nothing (issue 15), with a tiny open_clip model and plain torch: a
checkpoint is a `.partial-*` folder until renamed, a damaged newest checkpoint is skipped for the one
before it, metrics.jsonl and TensorBoard keep one row per step across resumes, and a worker started
by torchrun dies with its agent. (DeepSpeed on two ranks: tests/component/test_training.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.cli import main as cli
from pipeline.lifetime import is_launcher
from stages.training.engine import PlainEngine
from stages.training.loop import checkpoint_problem, read_meta
from tests.component.test_training import _images, _manifest, _state
from tests.conftest import REPO, cli_env

# 8 images, batch 4: 2 steps per epoch, 8 steps; checkpoints at 2, 4, 6, 8, the newest two kept
SETTINGS = {"loss": "gpr", "epochs": 4, "checkpoint_every": 2, "num_workers": 0}
STEPS = list(range(1, 9))


def _out(folder: Path) -> Path:
    return folder / "run" / "finetune" / "mcip"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models) -> Path:
    """One uninterrupted finetune run; tests copy it and damage the copy."""
    folder = tmp_path_factory.mktemp("finished")
    _images(folder / "run", shards=1, per_shard=8)
    assert cli(["run", str(_manifest(folder, tiny_models, finetune=SETTINGS)), "--stage", "finetune"]) == 0
    assert sorted(p.name for p in (_out(folder) / "ckpt").iterdir()) == ["step-00000006", "step-00000008"]
    return folder


def _copy(finished: Path, folder: Path, tiny_models) -> Path:
    """The finished run as it was before its final export: the stage is to run again from its
    checkpoints. Returns the manifest."""
    shutil.copytree(finished / "run", folder / "run")
    (_out(folder) / "_done" / "final.json").unlink()
    shutil.rmtree(_out(folder) / "final")
    return _manifest(folder, tiny_models, finetune=SETTINGS)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_result(out: Path, finished: Path) -> None:
    """The final weights and the metrics of the uninterrupted run, one row per step."""
    straight, resumed = _state(_out(finished) / "final" / "model.pt"), _state(out / "final" / "model.pt")
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)
    rows = _rows(out)
    assert [r["step"] for r in rows] == STEPS
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in _rows(_out(finished))])


def _assert_board_steps_once(out: Path) -> None:
    pytest.importorskip("tensorboard", reason="the optional `tensorboard` extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in _rows(out)]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in _rows(out)], rel=1e-5)


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_in_place(path: Path) -> None:
    """Same size, but the zip directory at the end of the torch file is gone."""
    data = path.read_bytes()
    path.write_bytes(data[:-1024] + bytes(1024))


DAMAGES = {
    "state cut short": (lambda c: _cut_short(c / "state.pt"), "state.pt has"),
    "state damaged": (lambda c: _damage_in_place(c / "state.pt"), "RuntimeError"),
    "meta cut short": (lambda c: _cut_short(c / "meta.json"), "meta.json is not valid JSON"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(
    tmp_path, tiny_models, finished, capsys, damage
):
    manifest = _copy(finished, tmp_path, tiny_models)
    out = _out(tmp_path)
    newest = out / "ckpt" / "step-00000008"
    harm, reason = DAMAGES[damage]
    harm(newest)
    with open(out / "metrics.jsonl", "a") as metrics:  # a crash while writing the next row
        metrics.write('{"step": 9, "loss": 0.')
    (out / "ckpt" / ".partial-step-00000010").mkdir()  # a crash while saving the next checkpoint
    (out / "ckpt" / ".partial-step-00000010" / "state.pt").write_bytes(b"half")
    capsys.readouterr()

    assert cli(["run", str(manifest), "--stage", "finetune"]) == 0
    log = capsys.readouterr().err.splitlines()
    warnings = [line for line in log if " WARNING " in line and str(newest) in line]
    assert len(warnings) == 1 and reason in warnings[0], log
    assert any(f"resumed from {out / 'ckpt' / 'step-00000006'} (step 6" in line for line in log), log
    _assert_same_result(out, finished)
    _assert_board_steps_once(out)
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step-00000006", "step-00000008"]
    meta = read_meta(newest)  # step 8 trained again and written anew
    assert meta["step"] == 8 and checkpoint_problem(newest, meta) is None


def test_crash_while_saving_leaves_a_partial_folder_that_resume_removes(
    tmp_path, tiny_models, finished, monkeypatch
):
    _images(tmp_path / "run", shards=1, per_shard=8)
    manifest = _manifest(tmp_path, tiny_models, finetune=SETTINGS)
    out = _out(tmp_path)
    save = PlainEngine.save

    def save_then_crash(self, folder: Path) -> None:  # the process dies after writing step 8's state
        save(self, folder)
        if folder.name.endswith("8"):
            raise RuntimeError("killed while saving")

    monkeypatch.setattr(PlainEngine, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="killed while saving"):
        cli(["run", str(manifest), "--stage", "finetune"])
    names = sorted(p.name for p in (out / "ckpt").iterdir())
    assert names == [".partial-step-00000008", "step-00000004", "step-00000006"]
    assert not list(out.glob("ckpt/**/.*.tmp")), "state.pt is renamed into place when written"

    monkeypatch.setattr(PlainEngine, "save", save)
    assert cli(["run", str(manifest), "--stage", "finetune"]) == 0
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step-00000006", "step-00000008"]
    _assert_same_result(out, finished)


def test_no_usable_checkpoint_is_one_error_line_and_force_starts_over(
    tmp_path, tiny_models, finished, capsys
):
    manifest = _copy(finished, tmp_path, tiny_models)
    ckpt = _out(tmp_path) / "ckpt"
    _cut_short(ckpt / "step-00000008" / "state.pt")
    _cut_short(ckpt / "step-00000006" / "meta.json")
    capsys.readouterr()
    assert cli(["run", str(manifest), "--stage", "finetune"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: no checkpoint to resume from:")
    assert str(ckpt / "step-00000008") in err[-1] and "--force" in err[-1]
    assert any("WARNING" in line and str(ckpt / "step-00000006") in line for line in err)
    assert (ckpt / "step-00000008").is_dir() and (ckpt / "step-00000006").is_dir(), "nothing deleted"

    assert cli(["run", str(manifest), "--stage", "finetune", "--force"]) == 0
    _assert_same_result(_out(tmp_path), finished)  # a fresh start from the pretrained weights


def test_checkpoints_that_fail_to_load_are_named_with_what_to_do(tmp_path, tiny_models, finished, capsys):
    manifest = _copy(finished, tmp_path, tiny_models)
    ckpt = _out(tmp_path) / "ckpt"
    for step in (6, 8):
        _damage_in_place(ckpt / f"step-0000000{step}" / "state.pt")
    capsys.readouterr()
    assert cli(["run", str(manifest), "--stage", "finetune"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert str(ckpt / "step-00000008") in err[-1] and str(ckpt / "step-00000006") in err[-1]
    assert err[-1].endswith("; delete them to start over")  # --force would not help: their files look whole
    assert len([line for line in err if " WARNING " in line and "RuntimeError" in line]) == 2


def test_only_torchruns_agent_counts_as_the_launcher():
    python = "/venv/bin/python"
    assert is_launcher([python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline"])
    assert is_launcher([python, "/venv/bin/torchrun", "--standalone", "-m", "stages.finetune", "m.yaml"])
    assert is_launcher([python, "/venv/bin/accelerate", "launch", "-m", "pipeline", "run", "m.yaml"])
    assert not is_launcher(["/bin/bash", "launch/slurm_mcip.sh", "m.yaml"])
    assert not is_launcher(["srun", "python", "-m", "pipeline", "run", "torchrun.yaml"])
    assert not is_launcher([])


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie is dead; its new parent may be slow to reap it


def test_torchrun_worker_dies_when_its_agent_is_killed(tmp_path, tiny_models):
    """torchrun starts its worker in a session of its own: killing the agent alone must not leave it."""
    _images(tmp_path / "run", shards=1, per_shard=8)
    manifest = _manifest(tmp_path, tiny_models, finetune={**SETTINGS, "epochs": 500, "checkpoint_every": 500})
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        + ["-m", "pipeline", "run", str(manifest), "--stage", "finetune"],
        cwd=tmp_path,
        env=cli_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = _out(tmp_path) / "metrics.jsonl"
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
            assert agent.poll() is None, "torchrun ended before its worker trained a step"
            time.sleep(0.1)
        workers = _children(agent.pid)
        assert len(workers) == 1 and _is_running(workers[0])
        assert os.getsid(workers[0]) != os.getsid(agent.pid)  # beyond the reach of a killpg
        os.kill(agent.pid, signal.SIGKILL)  # the agent only
        agent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _is_running(workers[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _is_running(workers[0]), "the worker outlived torchrun"
    finally:
        for pid in workers:
            if _is_running(pid):
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(timeout=30)


def test_worker_that_starts_after_its_agent_died_exits(tmp_path):
    """The agent is SIGKILLed while its worker is still starting: by the time the worker asks to die
    with its parent, the parent is already init (or a subreaper); it must exit, not train on."""
    go, survived = tmp_path / "go", tmp_path / "survived"
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        + [str(REPO / "tests" / "helpers" / "late_start.py"), str(go), str(survived)],
        cwd=tmp_path,
        env=cli_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_file, worker = Path(f"{go}.pid"), None
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(timeout=30)
        go.touch()  # now the worker reaches die_with_launcher(), its agent gone
        deadline = time.monotonic() + 30
        while _is_running(worker) and time.monotonic() < deadline and not survived.exists():
            time.sleep(0.05)
        assert not survived.exists(), "die_with_launcher() returned in an orphaned worker"
        assert not _is_running(worker), "the worker outlived torchrun"
    finally:
        if worker and _is_running(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_global_batch_that_cannot_be_kept_is_one_line_before_any_step(
    tmp_path, tiny_models, finished, capsys, monkeypatch
):
    """The checkpoints were trained with a global batch of 4 (batch 4 x 1 process): 3 processes cannot
    keep it; a different `global_batch` is other settings. Either way one line, nothing trained."""
    _copy(finished, tmp_path, tiny_models)
    zero2 = str(REPO / "launch" / "deepspeed" / "zero2.json")
    metrics = (_out(tmp_path) / "metrics.jsonl").read_text()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    capsys.readouterr()
    assert (
        cli(
            [
                "run",
                str(_manifest(tmp_path, tiny_models, finetune={**SETTINGS, "deepspeed": zero2})),
                "--stage",
                "finetune",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: finetune: the global batch of 4 samples (kept from ")
    assert "batch_size 4 x 3 processes" in err[-1] and "run on 1 process," in err[-1], err[-1]

    monkeypatch.setenv("WORLD_SIZE", "1")
    manifest = _manifest(tmp_path, tiny_models, finetune={**SETTINGS, "global_batch": 8})
    assert cli(["run", str(manifest), "--stage", "finetune"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("error: ") and "was made with other settings" in err[-1] and "--force" in err[-1]
    )
    assert (_out(tmp_path) / "metrics.jsonl").read_text() == metrics  # no step was taken
