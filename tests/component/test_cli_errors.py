"""Bad manifests and inputs through the real CLI: one-line error, non-zero exit, nothing written."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import run_cli, write_manifest, write_url_table


def _manifest(tmp_path, **download):
    write_url_table(tmp_path / "urls.parquet", ["http://127.0.0.1:9/1.jpg"], labels=["a"])
    return write_manifest(tmp_path, download)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"captons_per_image": 5}, "stages.download.captons_per_image: unknown key, got 5"),
        ({"samples_per_shard": "many"}, "stages.download.samples_per_shard: input should be a valid integer"),
        ({"samples_per_shard": -3}, "stages.download.samples_per_shard: must be > 0, got -3"),
        ({"url_list": "gone.parquet"}, "stages.download.url_list: URL table not found"),
        ({"url_col": "link"}, "urls.parquet: no column 'link'"),
        ({"label_col": "class"}, "urls.parquet: no column 'class'"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_manifest_is_one_line_and_writes_nothing(tmp_path, change, message, command):
    manifest = _manifest(tmp_path, **change)
    result = run_cli(command, str(manifest), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_unreadable_url_table(tmp_path):
    manifest = _manifest(tmp_path)
    (tmp_path / "urls.parquet").write_bytes(b"PAR1 but not really a parquet file")
    for command in ("validate", "run", "plan"):
        result = run_cli(command, str(manifest), cwd=tmp_path)
        assert result.returncode == 2, command
        assert "urls.parquet: not a readable parquet table" in result.stderr
    assert not (tmp_path / "run").exists()


def test_validate_ok_and_unknown_stage_flag(tmp_path):
    manifest = _manifest(tmp_path)
    ok = run_cli("validate", str(manifest), cwd=tmp_path)
    assert ok.returncode == 0 and "ok (stages: download)" in ok.stdout
    bad = run_cli("run", str(manifest), "--stage", "sing", cwd=tmp_path)
    assert bad.returncode != 0 and "invalid choice: 'sing'" in bad.stderr


def test_unconfigured_stage_is_named(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"run": {"root": "run"}, "stages": {}}))
    result = run_cli("run", str(manifest), "--stage", "download", cwd=tmp_path)
    assert result.returncode == 2 and "stage 'download' is not configured" in result.stderr


def test_status_waits_only_for_an_upstream_stage_and_reports_a_bad_input(tmp_path):
    """A caption stage before its download is `waiting`; a missing evaluation folder is an error, not
    a wait (it would never arrive by running the pipeline)."""
    write_url_table(tmp_path / "urls.parquet", ["http://127.0.0.1:9/1.jpg"], labels=["a"])
    stages = {
        "download": {"url_list": "urls.parquet"},
        "caption": {"backend": "alt_text"},
        "evaluate": {
            "model": "ViT-B-32",
            "models": [{"name": "random"}],
            "retrieval": {"gpr": {"layout": "gpr1200", "path": "no-such-folder"}},
        },
    }
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        yaml.safe_dump({"run": {"root": "run"}, "stages": {k: stages[k] for k in ("download", "caption")}})
    )
    status = run_cli("status", str(manifest), cwd=tmp_path)
    assert status.returncode == 0 and "caption: waiting (the download stage is not complete" in status.stdout
    manifest.write_text(yaml.safe_dump({"run": {"root": "run"}, "stages": stages}))
    status = run_cli("status", str(manifest), cwd=tmp_path)
    assert status.returncode == 2 and "waiting" not in status.stdout + status.stderr
    assert status.stderr.startswith("error: ") and "no-such-folder" in status.stderr


@pytest.mark.parametrize(
    "env,message",
    [
        ({"RANK": "abc", "WORLD_SIZE": "2"}, "environment variable RANK='abc' is not a whole number"),
        ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK/WORLD_SIZE: rank 3 is not in [0, 2)"),
    ],
)
def test_bad_rank_variables_are_one_line(tmp_path, env, message):
    result = run_cli("validate", str(_manifest(tmp_path)), cwd=tmp_path, **env)
    assert result.returncode == 2 and result.stderr == f"error: {message}\n"


@pytest.mark.parametrize(
    "stage,settings,message",
    [
        (
            "finetune",
            {"pretrained": "nope"},
            "finetune: open_clip has no pretrained tag 'nope' for ViT-B-32 (tags: ",
        ),
        ("finetune", {"model": "ViT-Nope"}, "finetune: unknown open_clip architecture 'ViT-Nope'"),
        (
            "finetune",
            {"device": "gpu"},
            "stages.finetune.device: device must be cpu, cuda, cuda:N or mps, got 'gpu'",
        ),
        (
            "finetune",
            {"betas": [1.5, 0.999]},
            "stages.finetune.betas: betas must be in [0, 1), got [1.5, 0.999]",
        ),
        ("finetune", {"deepspeed": "ds.json"}, "finetune: DeepSpeed config"),
        ("finetune", {"config_dir": "no-configs"}, "finetune: open_clip config folder not found"),
        ("finetune", {"pretrained": "/no/such.pt"}, "finetune: checkpoint not found: /no/such.pt"),
        (
            "realign",
            {"unlocked_layers": 99},
            "realign: unlocked_layers 99 is more than the text tower's 12 blocks",
        ),
        ("realign", {"device": "cuda:x"}, "stages.realign.device: device must be cpu, cuda, cuda:N or mps"),
        ("evaluate", {"zero_shot": {"templates": ["a {} {}"]}}, "template 'a {} {}' must contain '{}' once"),
        (
            "evaluate",
            {"zero_shot": {"templates": ["a {name}"]}},
            "template 'a {name}' must contain '{}' once",
        ),
        (
            "evaluate",
            {"models": [{"name": "m", "checkpoint": "nope"}]},
            "evaluate: model 'm': open_clip has no",
        ),
    ],
)
def test_validate_checks_models_devices_and_training_settings(tmp_path, stage, settings, message):
    """Found by `validate`, before anything runs (reading configs, never building a model)."""
    (tmp_path / "ds.json").write_text("{not json")
    (tmp_path / "names.json").write_text('{"a": "cat"}')
    base = {
        "finetune": {"model": "ViT-B-32", "loss": "gpr"},
        "realign": {"model": "ViT-B-32"},
        "evaluate": {
            "model": "ViT-B-32",
            "models": [{"name": "random"}],
            "zero_shot": {"data": {"layout": "shards"}, "class_names": "names.json"},
        },
    }[stage]
    for key, value in settings.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"run": {"root": "run"}, "stages": {stage: base}}))
    result = run_cli("validate", str(manifest), cwd=tmp_path)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stderr.count("\n") == 1


def test_a_second_process_on_the_same_rank_is_refused(tmp_path):
    """A live process holds download's rank-0 lock: a second run on that rank stops and names it."""
    import os

    from shards.locks import FileLock
    from stages.layout import RunLayout

    manifest = _manifest(tmp_path)
    with FileLock(RunLayout(tmp_path / "run").lock("download", 0)):
        result = run_cli("run", str(manifest), cwd=tmp_path)
    assert result.returncode == 2
    assert f"stage download rank 0/1 is already running (pid {os.getpid()} on host " in result.stderr
    assert "set SLURM_PROCID/RANK to share the work" in result.stderr
    assert not (tmp_path / "run" / "images" / "_done").exists()
