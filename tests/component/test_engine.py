"""Engines for real: DeepSpeed ZeRO-2 through accelerate with 2 processes on gloo, and plain torch,
running MCIP steps on a tiny open_clip model (tests/helpers/engine_check.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env

CHECK = REPO / "tests" / "helpers" / "engine_check.py"


def _results(out, world):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _assert_trained_the_image_tower_only(result):
    assert all(math.isfinite(v) for v in result["losses"])
    assert result["losses"][-1] < result["losses"][0]  # same batch every step: the loss goes down
    assert result["text_identical"] and result["image_changed"]


def test_deepspeed_zero2_two_processes(tmp_path, tiny_models):
    args = [
        str(tmp_path / "out"),
        tiny_models["clip_arch"],
        str(tiny_models["clip_checkpoint"]),
        str(tiny_models["clip_configs"]),
        str(REPO / "launch" / "deepspeed" / "zero2.json"),
    ]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29611",
            str(CHECK),
            *args,
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = _results(tmp_path / "out", 2)
    for result in results:
        assert result["world_size"] == 2
        _assert_trained_the_image_tower_only(result)
        assert result["gathered"] == [0.0, 0.0, 1.0, 1.0]
    assert results[0]["proxies_sum"] == pytest.approx(results[1]["proxies_sum"], abs=0)  # ranks stay in sync


def test_plain_engine_single_process(tmp_path, tiny_models):
    args = [
        str(tmp_path / "out"),
        tiny_models["clip_arch"],
        str(tiny_models["clip_checkpoint"]),
        str(tiny_models["clip_configs"]),
    ]
    run = subprocess.run(
        [sys.executable, str(CHECK), *args], env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = _results(tmp_path / "out", 1)
    _assert_trained_the_image_tower_only(result)
    assert result["world_size"] == 1
