"""Unit bookkeeping in stages.base: done/pending, rank share, fingerprint mismatch, _SUCCESS.json."""

from __future__ import annotations

import json

import pytest

from shards import markers
from stages.base import RunContext, finish_stage, plan_units, sum_counts
from stages.download.img2dataset_run import failure_reason
from stages.errors import StageConfigError

UNITS = [f"{i:06d}" for i in range(5)]


def _ctx(tmp_path, rank=0, world=1, force=False):
    return RunContext(root=tmp_path, rank=rank, world_size=world, force=force)


def test_plan_skips_done_units_and_takes_rank_share(tmp_path):
    plan = plan_units("s", tmp_path, UNITS, {"a": 1}, _ctx(tmp_path, rank=1, world=2))
    assert plan.mine == ["000001", "000003"]
    plan.mark_done("000001", {"counts": {"ok": 2}})
    again = plan_units("s", tmp_path, UNITS, {"a": 1}, _ctx(tmp_path, rank=1, world=2))
    assert again.mine == ["000003"] and "000001" in again.done


def test_changed_settings_are_refused_with_what_changed(tmp_path):
    plan_units("s", tmp_path, UNITS, {"size": 256}, _ctx(tmp_path)).mark_done("000000", {})
    with pytest.raises(StageConfigError, match=r"size: 256 -> 128.*--force"):
        plan_units("s", tmp_path, UNITS, {"size": 128}, _ctx(tmp_path))
    forced = plan_units("s", tmp_path, UNITS, {"size": 128}, _ctx(tmp_path, force=True))
    assert forced.mine == UNITS and markers.read_marker(tmp_path, "000000") is None


def test_success_file_only_when_all_units_done(tmp_path):
    plan = plan_units("s", tmp_path, UNITS[:2], {}, _ctx(tmp_path))
    plan.mark_done("000000", {"counts": {"ok": 2, "by": {"x": 1}}})
    assert not finish_stage("s", plan, 1, sum_counts).is_complete
    assert not (tmp_path / "_SUCCESS.json").exists()
    plan.mark_done("000001", {"counts": {"ok": 3, "by": {"x": 2, "y": 1}}})
    result = finish_stage("s", plan, 1, sum_counts)
    assert result.is_complete
    success = json.loads((tmp_path / "_SUCCESS.json").read_text())
    assert success["counts"] == {"ok": 5, "by": {"x": 3, "y": 1}}


@pytest.mark.parametrize(
    "message,reason",
    [
        ("HTTP Error 404: Not Found", "http 404"),
        ("Image decoding error", "not a decodable image"),
        (
            "OpenCV(4.14.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:79: error: (-215:Assertion failed)",
            "image too large",
        ),
        ("unknown url type: ''", "bad url"),
        ("x" * 100, "x" * 57 + "..."),
    ],
)
def test_failure_reasons_are_short_and_countable(message, reason):
    assert failure_reason(message) == reason


def test_a_damaged_marker_is_a_shard_error_naming_its_file(tmp_path):
    from stages.errors import ShardError

    markers.write_marker(tmp_path, "000000", {"unit": "000000", "fingerprint": "x", "settings": {}})
    markers.marker_path(tmp_path, "000001").write_text('{"fingerprint": "x", "cou')  # cut off by a crash
    with pytest.raises(ShardError, match=r"_done/000001.json: marker is not valid JSON .*delete it to redo"):
        plan_units("caption", tmp_path, ["000000", "000001"], {"a": 1}, RunContext(tmp_path))


def test_labels_reject_missing_and_nan_with_the_row_number(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.download import DownloadConfig, load_url_table

    table = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["a", "b", "c"], "label": [1.0, float("nan"), 2.0]}), table)
    cfg = DownloadConfig(url_list=table, label_col="label")
    with pytest.raises(
        StageConfigError, match=r"column 'label' is empty in row 1 \(1 rows without a label\)"
    ):
        load_url_table(cfg)
