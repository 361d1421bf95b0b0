"""The whole-stage view from the marker summary (shards/marker_view.py) against the markers themselves.

Every answer `status` and `plan` take from the summary's columns (which units are current, which
have files that changed, the merged counts) must be the one the markers read one by one give, and
stay so when markers, files, the summary or its counts cache change under it.
"""

from __future__ import annotations

import os

import pytest

from shards import marker_summary, marker_view, markers
from stages.base import RunContext, damaged_units, fingerprint_of, plan_units, read_markers, sum_counts

UNITS = [f"{i:06d}" for i in range(60)]


def _stage(tmp_path, units=UNITS):
    """Units done with settings {"a": 1} (every 7th with {"a": 2}), each with two recorded files."""
    for wanted in ({"a": 1}, {"a": 2}):
        chosen = [u for i, u in enumerate(units) if (i % 7 == 0) == (wanted == {"a": 2})]
        plan = plan_units("s", tmp_path, chosen, wanted, RunContext(root=tmp_path, force=True))
        for unit in chosen:
            files = [tmp_path / f"{unit}.bin", tmp_path / f"{unit}.txt"]
            for path in files:
                path.write_bytes(unit.encode() * (1 + int(unit) % 3))
            counts = {"ok": int(unit), "failed_by_reason": {"timeout": int(unit) % 2}, "score": 0.1}
            plan.mark_done(unit, {"counts": counts}, outputs=files)
    return fingerprint_of({"a": 1})


def _fresh_process():
    marker_summary._memory.clear()


def _answers(found, stage_dir, fingerprint):
    current = marker_view.with_fingerprint(found, fingerprint)
    damaged = damaged_units(stage_dir, current)
    done = marker_view.without(current, damaged)
    return sorted(current), sorted(damaged), list(done), marker_view.merged(done, sum_counts)


def test_the_view_answers_as_the_markers_do(tmp_path):
    fingerprint = _stage(tmp_path)
    (tmp_path / "000003.bin").write_bytes(b"x")  # another size
    (tmp_path / "000005.txt").unlink()
    os.utime(tmp_path / "000008.bin", ns=(1, 1))  # another mtime, same content: not damaged
    direct = _answers(markers.read_markers(tmp_path, UNITS), tmp_path, fingerprint)
    read_markers(tmp_path, UNITS, tmp_path)  # builds the summary
    _fresh_process()
    view = read_markers(tmp_path, UNITS, tmp_path)
    assert isinstance(view, marker_view.MarkerView)
    assert _answers(view, tmp_path, fingerprint) == direct
    assert sorted(direct[1]) == ["000003", "000005"] and len(direct[0]) == len(UNITS) - 9
    assert view["000004"]["counts"] == markers.read_marker(tmp_path, "000004")["counts"]


def test_merged_counts_come_from_the_cache_only_for_the_same_markers(tmp_path):
    fingerprint = _stage(tmp_path)
    calls = []

    def counting_merge(found):
        calls.append(len(found))
        return sum_counts(found)

    def merged_now():
        _fresh_process()
        view = marker_view.with_fingerprint(read_markers(tmp_path, UNITS, tmp_path), fingerprint)
        return marker_view.merged(view, counting_merge)

    first = merged_now()
    assert merged_now() == first and len(calls) == 1  # the second from the counts file
    path = markers.marker_path(tmp_path, "000004")
    stat = path.stat()
    path.write_text(path.read_text().replace('"ok": 4', '"ok": 5'))  # same size, in place
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert merged_now()["ok"] == first["ok"] + 1 and len(calls) == 2
    markers.remove_marker(tmp_path, "000010")
    assert merged_now()["ok"] == first["ok"] + 1 - 10 and len(calls) == 3


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"not arrow at all"),
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        lambda p: p.write_bytes(b""),
    ],
    ids=["garbage", "cut-off", "empty"],
)
def test_a_damaged_summary_or_counts_file_is_read_again_from_the_markers(tmp_path, damage):
    fingerprint = _stage(tmp_path)
    expected = _answers(markers.read_markers(tmp_path, UNITS), tmp_path, fingerprint)
    summary = marker_summary.summary_file(tmp_path, tmp_path)
    _answers(read_markers(tmp_path, UNITS, tmp_path), tmp_path, fingerprint)  # summary and counts
    damage(summary)
    marker_summary.counts_file(summary).write_text('{"not": "a digest"')
    _fresh_process()
    assert _answers(read_markers(tmp_path, UNITS, tmp_path), tmp_path, fingerprint) == expected


def test_a_marker_set_after_the_read_is_the_one_seen(tmp_path):
    """A unit finished in this process (plan.mark_done) is kept as written, not as the summary's
    older row, and its merge is not taken from the cache."""
    fingerprint = _stage(tmp_path)
    view = read_markers(tmp_path, UNITS, tmp_path)
    before = marker_view.merged(marker_view.with_fingerprint(view, fingerprint), sum_counts)
    view["000001"] = {**view["000001"], "counts": {"ok": 1001}}
    after = marker_view.merged(marker_view.with_fingerprint(view, fingerprint), sum_counts)
    assert after["ok"] == before["ok"] + 1000
    del view["000002"]
    assert "000002" not in marker_view.with_fingerprint(view, fingerprint)


def _rewrite_summary(summary, change):
    import pyarrow as pa

    with pa.OSFile(str(summary)) as source:
        table = pa.ipc.open_file(source).read_all()
    table = change(table)
    with pa.OSFile(str(summary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


@pytest.mark.parametrize("damage", ["rest not JSON", "null mtimes"])
def test_a_summary_damaged_inside_valid_arrow_is_not_believed(tmp_path, damage):
    """Rows whose JSON does not decode are read from their markers; a key column with nulls (never
    written so) makes the whole file unusable: either way the answers are the markers'."""
    import pyarrow as pa

    fingerprint = _stage(tmp_path)
    expected = _answers(markers.read_markers(tmp_path, UNITS), tmp_path, fingerprint)
    summary = marker_summary.summary_file(tmp_path, tmp_path)
    read_markers(tmp_path, UNITS, tmp_path)

    def change(table):
        if damage == "rest not JSON":
            return table.set_column(
                table.schema.get_field_index("rest"), "rest", pa.array(["{"] * len(table))
            )
        nulls = pa.nulls(len(table), pa.int64())
        return table.set_column(table.schema.get_field_index("mtime_ns"), "mtime_ns", nulls)

    _rewrite_summary(summary, change)
    marker_summary.counts_file(summary).unlink(missing_ok=True)
    _fresh_process()
    assert _answers(read_markers(tmp_path, UNITS, tmp_path), tmp_path, fingerprint) == expected


def test_values_beyond_int64_are_not_recorded_and_inodes_fit(tmp_path):
    """A marker claiming a file of 2**63 bytes is kept with that size unrecorded (so the file is
    checked, and found to differ), not an OverflowError; a 64-bit inode number maps to int64."""
    fingerprint = _stage(tmp_path, UNITS[:3])
    path = markers.marker_path(tmp_path, "000001")
    path.write_text(path.read_text().replace('"bytes": 12', f'"bytes": {2**63}', 1))
    direct = _answers(markers.read_markers(tmp_path, UNITS[:3]), tmp_path, fingerprint)
    assert _answers(read_markers(tmp_path, UNITS[:3], tmp_path), tmp_path, fingerprint) == direct
    assert "000001" in direct[1]
    assert marker_summary._signed(2**64 - 1) == -1 and marker_summary._signed(5) == 5


def test_a_summary_or_counts_write_cut_short_by_a_kill_is_cleaned_by_the_next(tmp_path):
    fingerprint = _stage(tmp_path)

    def merged_now():
        _fresh_process()
        view = marker_view.with_fingerprint(read_markers(tmp_path, UNITS, tmp_path), fingerprint)
        return marker_view.merged(view, sum_counts)

    merged_now()
    written = sorted(tmp_path.rglob("*.arrow")) + sorted(tmp_path.rglob("*.counts.json"))
    assert len(written) == 2
    orphans = [path.parent / f".{path.name}.0123abcd.tmp" for path in written]
    for orphan in orphans:
        orphan.write_bytes(b"cut short")
    markers.remove_marker(tmp_path, "000010")  # the next read writes both again
    merged_now()
    assert not any(orphan.exists() for orphan in orphans) and all(path.exists() for path in written)
