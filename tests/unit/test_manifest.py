"""Manifest loading: strict keys, one-line errors naming file, key path and value; relative paths."""

from __future__ import annotations

import pytest
import yaml

from pipeline.context import rank_and_world
from pipeline.manifest import ManifestError, load_manifest


def _write(tmp_path, data) -> str:
    (tmp_path / "urls.parquet").write_bytes(b"")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _download(**extra):
    return {"run": {"root": "out"}, "stages": {"download": {"url_list": "urls.parquet", **extra}}}


def test_paths_are_relative_to_the_manifest_folder(tmp_path):
    manifest = load_manifest(_write(tmp_path, _download()))
    assert manifest.run.root == tmp_path / "out"
    assert manifest.stages.download.url_list == tmp_path / "urls.parquet"
    assert manifest.configured_stages() == ["download"]


@pytest.mark.parametrize(
    "data,message",
    [
        (_download(samples_per_shard=-3), "stages.download.samples_per_shard: must be > 0, got -3"),
        (_download(captons_per_image=5), "stages.download.captons_per_image: unknown key, got 5"),
        (_download(image_size="big"), "stages.download.image_size: input should be a valid integer"),
        (_download(input_format="xls"), "stages.download.input_format: must be one of"),
        ({"stages": {}}, "run: required key is missing"),
        ({"run": {"root": "out"}, "stages": {"dowload": {}}}, "stages.dowload: unknown key"),
    ],
)
def test_errors_name_file_key_and_value(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text
    assert "\n" not in text


def test_missing_url_file_is_named(tmp_path):
    path = _write(tmp_path, _download(url_list="nowhere.csv"))
    with pytest.raises(ManifestError, match=r"stages.download.url_list: URL table not found: .*nowhere.csv"):
        load_manifest(path)


@pytest.mark.parametrize(
    "text,message", [("run: [1, 2", "not valid YAML"), ("- a\n- b\n", "a manifest is a mapping")]
)
def test_unreadable_yaml(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(_write(tmp_path, text))


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "none.yaml")


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, (0, 1)),
        ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4)),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "RANK": "0", "WORLD_SIZE": "1"}, (2, 3)),
        ({"SLURM_PROCID": "0"}, (0, 1)),  # SLURM_NTASKS is only set with --ntasks
        # srun + torchrun: SLURM_PROCID is the node, torchrun's RANK the process
        (
            {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"},
            (5, 8),
        ),
        # array task 3 of 0-3 (count 4), 2 tasks each: task 1 of it is rank 7 of 8
        (
            {
                "SLURM_PROCID": "1",
                "SLURM_NTASKS": "2",
                "SLURM_ARRAY_TASK_ID": "3",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_COUNT": "4",
            },
            (7, 8),
        ),
        (
            {
                "SLURM_PROCID": "0",
                "SLURM_ARRAY_TASK_ID": "11",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_COUNT": "2",
            },
            (1, 2),
        ),
    ],
)
def test_rank_and_world_from_env(env, expected):
    assert rank_and_world(env) == expected


def test_rank_outside_world_is_an_error():
    with pytest.raises(ValueError, match="RANK/WORLD_SIZE: rank 4 is not in"):
        rank_and_world({"RANK": "4", "WORLD_SIZE": "4"})


def _evaluate(**extra):
    section = {
        "model": "ViT-B-32",
        "models": [{"name": "base", "checkpoint": "openai"}],
        "retrieval": {"gpr": {"layout": "gpr1200", "path": "gpr"}},
        **extra,
    }
    return {"run": {"root": "out"}, "stages": {"evaluate": section}}


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"models": []}, "stages.evaluate.models: list should have at least 1 item"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "model names must be unique"),
        (
            {"models": [{"name": "a", "stage": "caption/x"}]},
            "stages.evaluate.models.0.stage: string should match",
        ),
        (
            {"models": [{"name": "a", "stage": "finetune/x", "checkpoint": "openai"}]},
            "give `checkpoint` or `stage`",
        ),
        ({"retrieval": {"gpr": {"layout": "zip"}}}, "stages.evaluate.retrieval.gpr.layout: must be one of"),
        ({"grid": "other"}, "grid 'other' is not a retrieval dataset (gpr)"),
        ({"retrieval": {}}, "nothing to evaluate"),
        (
            {
                "zero_shot": {
                    "data": {"layout": "folder", "path": "x"},
                    "class_names": "n.json",
                    "templates": ["a photo"],
                }
            },
            "template 'a photo' must contain '{}' once and no other braces",
        ),
    ],
)
def test_evaluate_section_errors(tmp_path, extra, message):
    with pytest.raises(ManifestError, match=None) as err:
        load_manifest(_write(tmp_path, _evaluate(**extra)))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_evaluate_paths_and_model_entries(tmp_path):
    cfg = load_manifest(
        _write(
            tmp_path,
            _evaluate(
                models=[
                    {"name": "base", "checkpoint": "./base.pt"},
                    {"name": "mcip+re-a", "stage": "realign/mcip"},
                ]
            ),
        )
    ).stages.evaluate
    assert cfg.retrieval["gpr"].path == tmp_path / "gpr"
    assert cfg.models[0].checkpoint == str(tmp_path / "base.pt")
    assert cfg.models[1].stage == "realign/mcip"
