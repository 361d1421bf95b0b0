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
        load_url_table(cfg, tmp_path / "run")


def _done_stage(tmp_path, units, fingerprint_settings):
    """A stage folder where every unit has a marker and a small recorded output file."""
    plan = plan_units("s", tmp_path, units, fingerprint_settings, _ctx(tmp_path))
    for unit in units:
        (tmp_path / f"{unit}.bin").write_bytes(unit.encode())
        plan.mark_done(unit, {"counts": {"ok": 1}}, outputs=[tmp_path / f"{unit}.bin"])
    markers.clear_success(tmp_path)


def test_a_rank_reads_and_checks_only_its_own_units(tmp_path, monkeypatch):
    """Rank 3 of 64 over 640 done units reads 10 markers and stats 10 outputs, not 640."""
    from shards import marker_summary

    units = [f"{i:06d}" for i in range(640)]
    _done_stage(tmp_path, units, {"a": 1})
    reads, checks = [], []
    real_read, real_changed = markers.read_marker, marker_summary.outputs_changed
    monkeypatch.setattr(markers, "read_marker", lambda d, u: reads.append(u) or real_read(d, u))
    monkeypatch.setattr(
        marker_summary,
        "outputs_changed",
        lambda d, m, fd=None: checks.append(m["unit"]) or real_changed(d, m, fd),
    )
    plan = plan_units("s", tmp_path, units, {"a": 1}, _ctx(tmp_path, rank=3, world=64))
    assert plan.mine == [] and sorted(reads) == sorted(checks) == units[3::64]


def test_the_rank_that_finds_every_rank_done_writes_success(tmp_path):
    """Ranks leave their files as their shares finish; the last one checks every marker once and
    writes _SUCCESS.json; a rank with pending work removes its file before it starts."""
    for rank in (1, 0):
        plan = plan_units("s", tmp_path, UNITS, {"a": 1}, _ctx(tmp_path, rank=rank, world=2))
        for unit in plan.mine:
            plan.mark_done(unit, {"counts": {"ok": 1}})
        result = finish_stage("s", plan, len(plan.mine), sum_counts)
        assert result.is_complete == (rank == 0) and (tmp_path / "_SUCCESS.json").exists() == (rank == 0)
    assert json.loads((tmp_path / "_SUCCESS.json").read_text())["counts"] == {"ok": 5}
    markers.remove_marker(tmp_path, "000003")  # rank 1's
    again = plan_units("s", tmp_path, UNITS, {"a": 1}, _ctx(tmp_path, rank=1, world=2))
    assert again.mine == ["000003"] and not (tmp_path / "_done" / "_ranks" / "2-1.json").exists()
    lonely = plan_units("s", tmp_path, UNITS, {"a": 1}, _ctx(tmp_path, rank=0, world=2))
    assert not finish_stage("s", lonely, 0, sum_counts).is_complete  # rank 1's file is gone
    again.mark_done("000003", {"counts": {"ok": 1}})
    assert finish_stage("s", again, 1, sum_counts).is_complete


def test_the_marker_summary_never_says_more_than_the_markers(tmp_path, monkeypatch):
    """Read once, the whole-stage view comes from the summary (no marker read); a marker rewritten,
    edited in place with its mtime put back, or removed is seen at once."""
    import os

    from stages.base import read_markers

    units = [f"{i:06d}" for i in range(20)]
    _done_stage(tmp_path, units, {"a": 1})
    read_markers(tmp_path, units, tmp_path)
    from shards import marker_summary

    marker_summary._memory.clear()  # as a new process: from the file
    reads = []
    real_read = markers.read_marker
    monkeypatch.setattr(markers, "read_marker", lambda d, u: reads.append(u) or real_read(d, u))
    monkeypatch.setattr(marker_summary, "read_marker", markers.read_marker)
    assert len(read_markers(tmp_path, units, tmp_path)) == 20 and reads == []
    path = markers.marker_path(tmp_path, "000004")
    stat = path.stat()
    path.write_text(path.read_text().replace('"ok": 1', '"ok": 7'))  # same size, in place
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    markers.remove_marker(tmp_path, "000009")
    found = read_markers(tmp_path, units, tmp_path)
    assert reads == ["000004"] and found["000004"]["counts"] == {"ok": 7} and "000009" not in found
    assert "settings" not in found["000001"] and found["000001"]["fingerprint"]
