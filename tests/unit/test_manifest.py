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


@pytest.mark.parametrize("data,message", [
    (_download(samples_per_shard=-3), "stages.download.samples_per_shard: must be > 0, got -3"),
    (_download(captons_per_image=5), "stages.download.captons_per_image: unknown key, got 5"),
    (_download(image_size="big"), "stages.download.image_size: input should be a valid integer"),
    (_download(input_format="xls"), "stages.download.input_format: must be one of"),
    ({"stages": {}}, "run: required key is missing"),
    ({"run": {"root": "out"}, "stages": {"dowload": {}}}, "stages.dowload: unknown key"),
])
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


@pytest.mark.parametrize("text,message", [("run: [1, 2", "not valid YAML"), ("- a\n- b\n", "a manifest is a mapping")])
def test_unreadable_yaml(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(_write(tmp_path, text))


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "none.yaml")


@pytest.mark.parametrize("env,expected", [
    ({}, (0, 1)),
    ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4)),
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "RANK": "0", "WORLD_SIZE": "1"}, (2, 3)),
    ({"SLURM_PROCID": "0"}, (0, 1)),  # SLURM_NTASKS is only set with --ntasks
])
def test_rank_and_world_from_env(env, expected):
    assert rank_and_world(env) == expected


def test_rank_outside_world_is_an_error():
    with pytest.raises(ValueError, match="RANK=4"):
        rank_and_world({"RANK": "4", "WORLD_SIZE": "4"})
