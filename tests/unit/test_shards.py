"""Shard naming, rank split, atomic writes, markers, tars, tables and the wids index."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards import markers
from shards.atomic import atomic_write, remove_orphans, write_json_atomic
from shards.identity import file_sha256
from shards.index import write_shard_index
from shards.naming import list_shards, rank_split, shard_name
from shards.reader import iter_samples
from shards.tables import TableError, read_table
from shards.tars import TruncatedTarError, read_tar_samples, tar_keys, write_tar_atomic


def test_shard_names_sort_numerically():
    assert shard_name(42) == "000042"
    assert shard_name(1_234_567) == "1234567"
    with pytest.raises(ValueError):
        shard_name(-1)


def test_list_shards_ignores_other_files(tmp_path):
    for name in ("000010.tar", "000002.tar", "notes.tar", ".000003.tar.tmp", "000004.parquet"):
        (tmp_path / name).write_bytes(b"")
    assert list_shards(tmp_path, ".tar") == ["000002", "000010"]


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_rank_split_is_disjoint_and_complete(world):
    units = [shard_name(i) for i in range(20)]
    parts = [rank_split(units, r, world) for r in range(world)]
    assert sorted(u for part in parts for u in part) == units
    assert sum(len(p) for p in parts) == len(units)


def test_rank_split_rejects_bad_rank():
    with pytest.raises(ValueError, match="bad rank 2"):
        rank_split(["a"], 2, 2)


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_json_skips_identical_content(tmp_path):
    target = tmp_path / "a.json"
    assert write_json_atomic(target, {"x": 1}) is True
    before = target.stat().st_mtime_ns
    assert write_json_atomic(target, {"x": 1}) is False
    assert target.stat().st_mtime_ns == before
    assert write_json_atomic(target, {"x": 2}) is True


def test_remove_orphans_only_touches_temporary_files(tmp_path):
    (tmp_path / ".000001.tar.3f2a.tmp").write_bytes(b"x")
    (tmp_path / ".000002.tar.9c1b.tmp").write_bytes(b"x")
    (tmp_path / "000001.tar").write_bytes(b"x")
    removed = remove_orphans(tmp_path, "000001")
    assert [p.name for p in removed] == [".000001.tar.3f2a.tmp"]
    assert (tmp_path / "000001.tar").exists() and (tmp_path / ".000002.tar.9c1b.tmp").exists()


def test_markers_roundtrip_and_bad_json_names_file(tmp_path):
    marker = {"unit": "000003", "fingerprint": "abc", "settings": {"k": 3}}
    markers.write_marker(tmp_path, "000003", marker)
    assert markers.read_marker(tmp_path, "000003") == marker
    assert markers.read_marker(tmp_path, "000004") is None
    markers.marker_path(tmp_path, "000005").write_text("{half")
    with pytest.raises(ValueError, match="000005.json"):
        markers.read_marker(tmp_path, "000005")


def _samples():
    return [("b", {"jpg": b"\xff\xd8two", "cls": b"1"}), ("a", {"jpg": b"\xff\xd8one", "txt": b"hi"})]


def test_tar_writer_is_deterministic_and_readable_by_webdataset(tmp_path):
    info_1 = write_tar_atomic(tmp_path / "1.tar", _samples())
    info_2 = write_tar_atomic(tmp_path / "2.tar", _samples())
    assert info_1 == info_2 and info_1["samples"] == 2
    assert info_1["tar_sha256"] == file_sha256(tmp_path / "1.tar")
    read = list(iter_samples([tmp_path / "1.tar"]))
    assert [s["__key__"] for s in read] == ["b", "a"]
    assert read[0]["cls"] == b"1" and read[1]["txt"] == b"hi"


def test_truncated_tar_is_rejected(tmp_path):
    write_tar_atomic(tmp_path / "full.tar", [("k", {"jpg": b"x" * 5000})])
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:2048])
    with pytest.raises(TruncatedTarError, match="cut.tar"):
        read_tar_samples(tmp_path / "cut.tar")
    assert list(read_tar_samples(tmp_path / "full.tar")) == ["k"]


def test_read_table_errors_name_file_and_column(tmp_path):
    pq.write_table(pa.table({"link": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(TableError, match=r"t.parquet: no column 'url' \(columns: link\)"):
        read_table(tmp_path / "t.parquet", columns=["url"])
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(TableError, match="bad.parquet: not a readable parquet table"):
        read_table(tmp_path / "bad.parquet", columns=["url"])


@pytest.mark.parametrize(
    "suffix,body",
    [
        ("csv", "url,label\nhttp://x/1.jpg,cat\n"),
        ("tsv", "url\tlabel\nhttp://x/1.jpg\tcat\n"),
        ("jsonl", '{"url": "http://x/1.jpg", "label": "cat"}\n'),
    ],
)
def test_read_table_text_formats(tmp_path, suffix, body):
    path = tmp_path / f"urls.{suffix}"
    path.write_text(body)
    table = read_table(path, columns=["url", "label"])
    assert table.to_pydict() == {"url": ["http://x/1.jpg"], "label": ["cat"]}


def test_shard_index_has_wids_kind(tmp_path):
    write_shard_index(
        tmp_path / "_index.json",
        [
            {"url": "000001.tar", "nsamples": 3, "filesize": 10},
            {"url": "000000.tar", "nsamples": 2, "filesize": 9},
        ],
    )
    index = json.loads((tmp_path / "_index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [s["url"] for s in index["shardlist"]] == ["000000.tar", "000001.tar"]


def test_file_hashes_are_cached_by_path_size_and_mtime(tmp_path):
    from shards import identity

    data = tmp_path / "table.parquet"
    data.write_bytes(b"x" * 1000)
    real = identity.sha256_of(data)
    identity.use_cache_dir(tmp_path / "cache")
    try:
        assert identity.file_sha256(data) == real
        (entry,) = (tmp_path / "cache" / "sha256").glob("*.json")
        stored = json.loads(entry.read_text())
        assert stored["sha256"] == real and stored["size"] == 1000
        identity._memory.clear()  # a new process: only the disk entry is left
        entry.write_text(json.dumps({**stored, "sha256": "from-the-cache"}))
        assert identity.file_sha256(data) == "from-the-cache"  # looked up, not read
        identity._memory.clear()
        data.write_bytes(b"y" * 1000)  # same size, new mtime: hashed again
        os.utime(data, ns=(stored["mtime_ns"] + 10**9,) * 2)
        assert identity.file_sha256(data) == identity.sha256_of(data) != real
    finally:
        identity.use_cache_dir(None)
        identity._memory.clear()


@pytest.mark.parametrize(
    "content, problem",
    [
        ("[]", "marker is not a JSON object (a list)"),
        ('"done"', "marker is not a JSON object (a str)"),
        ('{"unit": "000003", "fingerprint": "abc"}', "marker field 'settings': field required"),
        (
            '{"unit": "000004", "fingerprint": "abc", "settings": {}}',
            "marker is for unit '000004', not '000003'",
        ),
        (
            '{"unit": "000003", "fingerprint": "abc", "settings": {}, "outputs": {"a.tar": {"bytes": "5"}}}',
            "marker field 'outputs.a.tar.bytes': input should be a valid integer",
        ),
        (
            '{"unit": "000003", "fingerprint": "x", "settings": {}, "outputs": {"/x": {"bytes": 5}}}',
            "'/x' is not a path inside the stage folder",
        ),
    ],
)
def test_a_marker_that_is_not_a_marker_of_its_unit_names_its_file(tmp_path, content, problem):
    markers.marker_path(tmp_path, "000003").parent.mkdir(parents=True, exist_ok=True)
    markers.marker_path(tmp_path, "000003").write_text(content)
    with pytest.raises(markers.MarkerError) as err:
        markers.read_marker(tmp_path, "000003")
    assert str(err.value).startswith(f"{markers.marker_path(tmp_path, '000003')}: ") and problem in str(
        err.value
    )


def test_a_header_with_a_negative_size_is_refused_not_followed_round_in_circles(tmp_path):
    """tarfile takes a pax `size=-512` and jumps back to an earlier header, for ever."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in ("000.jpg", "001.txt", "001.jpg"):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = 600, {"size": "-512"} if name == "001.txt" else {}
            archive.addfile(info, io.BytesIO(b"x" * 600))
    path = tmp_path / "hostile.tar"
    path.write_bytes(out.getvalue())
    reason = r"hostile.tar: member '001.txt' has a bad header \(size -512"
    for read in (tar_keys, read_tar_samples):
        with pytest.raises(TruncatedTarError, match=reason):
            read(path)


def test_a_tar_cut_between_members_is_refused_though_tarfile_reads_it_as_shorter(tmp_path):
    path = tmp_path / "000000.tar"
    write_tar_atomic(path, [(f"{n:03d}", {"jpg": b"x" * 600, "txt": b"alt"}) for n in range(3)])
    with tarfile.open(path) as archive:
        cut = [m for m in archive if m.name == "002.jpg"][0].offset
    path.write_bytes(path.read_bytes()[:cut])  # a whole number of blocks: no partial header
    for read in (tar_keys, read_tar_samples):
        with pytest.raises(
            TruncatedTarError, match=rf"000000.tar: no tar header or end-of-archive block at byte {cut}"
        ):
            read(path)
