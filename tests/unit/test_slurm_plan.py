"""The manifest's slurm section, `submit --dry-run`, and the status lines from the runs log (no cluster)."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline import run_log
from pipeline.manifest import ManifestError, load_manifest
from tests.conftest import make_image_shards, run_cli


def _manifest(tmp_path, slurm: dict | None = None):
    data = {
        "run": {"root": "run"},
        "stages": {
            "caption": {"backend": "alt_text"},
            "finetune": {"model": "RN50", "loss": "gpr"},
            "realign": {},
        },
    }
    if slurm is not None:
        data["slurm"] = slurm
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "slurm,message",
    [
        ({"default": {"nodes": 0}}, "slurm.default.nodes: must be > 0, got 0"),
        ({"default": {"time": "soon"}}, "slurm.default.time: string should match pattern"),
        ({"default": {"mem": "lots"}}, "slurm.default.mem: string should match pattern"),
        ({"caption": {"gpus": 4}}, "slurm.caption.gpus: unknown key, got 4"),
        ({"finetune": {"array": 4}}, "finetune: `array` is for the data stages"),
        ({"default": {"extra": ["-p gpu"]}}, "extra sbatch options must each be one '--option[=value]'"),
        ({"training": {}}, "slurm.training: unknown key"),
    ],
)
def test_bad_slurm_section_is_a_one_line_error(tmp_path, slurm, message):
    with pytest.raises(ManifestError) as err:
        load_manifest(_manifest(tmp_path, slurm))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_stage_section_overrides_only_its_keys(tmp_path):
    manifest = load_manifest(
        _manifest(
            tmp_path,
            {
                "default": {"partition": "gpu", "time": "04:00:00", "max_requeues": 5},
                "finetune": {"nodes": 2, "gpus_per_node": 8},
            },
        )
    )
    finetune, caption = manifest.slurm.resources("finetune"), manifest.slurm.resources("caption")
    assert (finetune.partition, finetune.time, finetune.nodes, finetune.processes_per_node) == (
        "gpu",
        "04:00:00",
        2,
        8,
    )
    assert (caption.nodes, caption.max_requeues, caption.processes_per_node) == (1, 5, 1)


def test_dry_run_prints_chained_sbatch_commands_pending_units_and_the_script(tmp_path):
    make_image_shards(tmp_path / "run", shards=3, per_shard=2)
    path = _manifest(
        tmp_path,
        {
            "default": {"time": "01:00:00", "signal_lead": 300, "max_requeues": 4},
            "caption": {"array": 3, "extra": ["--qos=low"]},
            "finetune": {"nodes": 2, "gpus_per_node": 4, "partition": "gpu"},
        },
    )
    done = run_cli("submit", str(path), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "# caption: 3 of 3 units pending" in out
    assert "# finetune: 1 of 1 units pending" in out
    assert "# realign: waiting for its input" in out  # the fine-tuned model is not there yet
    caption = next(line for line in out.splitlines() if line.startswith("JOB_CAPTION="))
    for option in (
        "--array=0-2",
        "--qos=low",
        "--signal=B:USR1@300",
        "--time=01:00:00",
        "--requeue",
        "--open-mode=append",
        "MCIP_MAX_REQUEUES=4",
        "--stage caption",
    ):
        assert option in caption
    finetune = next(line for line in out.splitlines() if line.startswith("JOB_FINETUNE="))
    assert "--dependency=afterok:$JOB_CAPTION" in finetune and "--nodes=2" in finetune
    assert (
        "--gpus-per-node=4" in finetune
        and "MCIP_NPROC_PER_NODE=4" in finetune
        and "--partition=gpu" in finetune
    )
    assert "#SBATCH --requeue" in out and "scontrol requeue" in out  # the launcher script follows
    assert not (tmp_path / "run" / "slurm").exists()  # nothing submitted or recorded


def test_status_names_units_left_pending_with_the_log_of_their_task(tmp_path):
    root = tmp_path / "run"
    make_image_shards(root, shards=4, per_shard=2)
    path = _manifest(tmp_path)
    runs = [
        {
            "stage": "caption",
            "rank": r,
            "world": 2,
            "started": 100.0 + r,
            "seconds": 4.0,
            "units_run": 1,
            "complete": False,
            "samples": 2,
            "job_id": "77",
            "log": str(root / f"logs/caption/77-task{r}.log"),
        }
        for r in (0, 1)
    ]
    run_log.runs_file(root).parent.mkdir(parents=True)
    run_log.runs_file(root).write_text("".join(json.dumps(r) + "\n" for r in runs))
    done = run_cli("status", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "last run 1.0 samples/s" in done.stdout  # 4 samples over the slower task's 4 s
    # rank 0 of 2 owned units 000000 and 000002, rank 1 the others
    assert f"000000 (log: {root}/logs/caption/77-task0.log)" in done.stdout
    assert f"000001 (log: {root}/logs/caption/77-task1.log)" in done.stdout
    assert f"000002 (log: {root}/logs/caption/77-task0.log)" in done.stdout
