"""URL lists as they ship (issue 19): folders and globs of files, one global row numbering, a rank
reading only its own rows, the input's identity recorded once per run root, img2dataset's filters.

    .venv/bin/python -m pytest tests/component/test_url_folders.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import yaml

from shards.tars import read_tar_samples
from stages.download import DownloadConfig, load_url_table, unit_rows, unit_table
from stages.errors import StageConfigError
from tests.conftest import REPO, cli_env


def _manifest(folder: Path, download: dict) -> Path:
    settings = {"samples_per_shard": 4, "processes": 1, "threads": 4, "image_size": 32, **download}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"run": {"root": "run", "seed": 0}, "stages": {"download": settings}}))
    return path


def _cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=cli_env(**env), capture_output=True, text=True
    )


def test_a_folder_of_three_parquet_files_downloads_with_global_keys_and_an_extra_column(
    tmp_path, image_server
):
    """3 files of 3, 4 and 3 rows (10 rows, shards of 4): keys are global row numbers across files,
    NSFW travels into each sample's .json, wide pictures are filtered (counted by reason, not as
    failures), and of two ranks the second to finish writes _SUCCESS.json."""
    meta = tmp_path / "meta"
    meta.mkdir()
    sizes, row = [3, 4, 3], 0
    for k, size in enumerate(sizes):
        rows = range(row, row + size)
        urls = [image_server.url(f"/{'wide' if r in (2, 7) else 'img'}/{r}.jpg") for r in rows]
        table = {"url": urls, "caption": [f"picture {r}" for r in rows], "NSFW": [f"nsfw-{r}" for r in rows]}
        pq.write_table(pa.table(table), meta / f"part-{k}.parquet")
        row += size
    (meta / "_SUCCESS").write_text("")  # as Spark leaves it: not a table
    manifest = _manifest(
        tmp_path,
        {
            "url_list": "meta",
            "caption_col": "caption",
            "save_additional_columns": ["NSFW"],
            "max_aspect_ratio": 2,
        },
    )
    first = _cli("run", str(manifest), "--stage", "download", cwd=tmp_path, RANK="0", WORLD_SIZE="2")
    assert first.returncode == 0, first.stderr
    images = tmp_path / "run" / "images"
    assert not (images / "_SUCCESS.json").exists()  # rank 1's shard is not done yet
    second = _cli("run", str(manifest), "--stage", "download", cwd=tmp_path, RANK="1", WORLD_SIZE="2")
    assert second.returncode == 0, second.stderr
    success = json.loads((images / "_SUCCESS.json").read_text())
    assert success["units"] == 3 and success["counts"]["ok"] == 8 and success["counts"]["failed"] == 0
    assert success["counts"]["filtered"] == 2
    assert success["counts"]["filtered_by_reason"] == {"aspect ratio too large": 2}
    samples = {}
    for unit in ("000000", "000001", "000002"):
        samples.update(read_tar_samples(images / f"{unit}.tar"))
    assert sorted(samples) == [f"{r:09d}" for r in range(10) if r not in (2, 7)]
    for key, fields in samples.items():
        meta_json = json.loads(fields["json"])
        assert meta_json["NSFW"] == f"nsfw-{int(key)}" and fields["txt"].decode() == f"picture {int(key)}"
    record = json.loads((images / "_input" / "record.json").read_text())
    assert [(f["name"], f["rows"]) for f in record["files"]] == [
        ("part-0.parquet", 3),
        ("part-1.parquet", 4),
        ("part-2.parquet", 3),
    ]


def _parquet_folder(folder: Path, sizes: list[int], row_group_size: int | None = None) -> list[dict]:
    folder.mkdir()
    rows, start = [], 0
    for k, size in enumerate(sizes):
        part = [
            {"url": f"http://127.0.0.1:9/{r}.jpg", "label": f"c{r % 3}"} for r in range(start, start + size)
        ]
        pq.write_table(
            pa.Table.from_pylist(part), folder / f"p{k:02d}.parquet", row_group_size=row_group_size
        )
        rows += part
        start += size
    return rows


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_a_units_rows_are_the_global_rows_across_files_and_row_groups(tmp_path, suffix):
    """Shards of 7 rows over files of 5, 9 and 6 rows (row groups of 2): each unit holds exactly the
    rows of the concatenated table, with class indexes over all files."""
    rows = _parquet_folder(tmp_path / "pq", [5, 9, 6], row_group_size=2)
    folder = tmp_path / "pq"
    if suffix != "parquet":
        folder = tmp_path / suffix
        folder.mkdir()
        for path in sorted((tmp_path / "pq").glob("*.parquet")):
            table = pq.read_table(path)
            if suffix == "csv":
                pa_csv.write_csv(table, folder / f"{path.stem}.csv")
            else:
                lines = [json.dumps(r) for r in table.to_pylist()]
                (folder / f"{path.stem}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DownloadConfig(url_list=folder, label_col="label", samples_per_shard=7)
    urls = load_url_table(cfg, tmp_path / "run")
    assert urls.num_rows == 20 and urls.labels == ["c0", "c1", "c2"]
    from stages.download.input_split import ensure_split

    ensure_split(urls)
    for unit in ("000000", "000001", "000002"):
        table = unit_table(urls, unit_rows(unit, urls.num_rows, cfg, tmp_path / "run")).to_pylist()
        expected = rows[int(unit) * 7 : int(unit) * 7 + 7]
        assert [r["url"] for r in table] == [r["url"] for r in expected]
        assert [r["cls"] for r in table] == [int(r["label"][1]) for r in expected]
        assert [r["mcip_row"] for r in table] == list(range(int(unit) * 7, int(unit) * 7 + len(expected)))
    retry = urls.read_rows([19, 3, 11])  # a retry shard's rows, in its order
    assert retry["mcip_row"].to_pylist() == [19, 3, 11]


RSS_SCRIPT = textwrap.dedent(
    """
    import re, sys
    from pathlib import Path
    from stages.base import RunContext, plan_units
    from stages.download import DownloadConfig, list_units, load_url_table, settings_of, unit_rows, unit_table
    folder = Path(sys.argv[1])
    cfg = DownloadConfig(url_list=folder / "meta", caption_col="caption", samples_per_shard=1000)
    ctx = RunContext(folder / "run", rank=3, world_size=500)
    urls = load_url_table(cfg, ctx.root)
    plan = plan_units("download", ctx.root / "images", list_units(urls.num_rows, cfg, ctx.root),
                      settings_of(cfg, urls), ctx)
    table = unit_table(urls, unit_rows(plan.mine[0], urls.num_rows, cfg, ctx.root))
    assert table.num_rows == 1000, table.num_rows
    # VmHWM, not ru_maxrss: Linux carries the forked parent's resident size across exec into the latter
    print(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
    """
)


def _peak_rss_kb(folder: Path, rows: int) -> int:
    (folder / "meta").mkdir(parents=True)
    for k in range(4):  # four files of rows/4 rows each, as a folder ships
        ids = range(k * rows // 4, (k + 1) * rows // 4)
        urls = pa.array([f"http://127.0.0.1:9/images/{i:012d}/a-rather-long-file-name.jpg" for i in ids])
        captions = pa.array([f"a caption of some length for the picture number {i:012d}" for i in ids])
        pq.write_table(pa.table({"url": urls, "caption": captions}), folder / "meta" / f"part-{k}.parquet")
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(folder)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_a_ranks_memory_does_not_grow_with_the_url_table(tmp_path):
    """Rank 3 of 500 records the input, plans and reads its shard of 1,000 rows: with a 1M-row table
    its peak RSS is that of the 10k-row one (reading the whole table would add ~150 MB)."""
    small = _peak_rss_kb(tmp_path / "small", 10_000)
    large = _peak_rss_kb(tmp_path / "large", 1_000_000)
    assert large - small < 30 * 1024, f"peak RSS {small // 1024} MB -> {large // 1024} MB"


def test_editing_adding_or_touching_a_url_file_is_caught_or_recorded(tmp_path, image_server):
    """After a complete run: a file touched (same bytes) is hashed again and recorded, nothing redone;
    a file edited, or a file added, is one error line naming it; --force redoes the stage."""
    meta = tmp_path / "meta"
    meta.mkdir()
    for k in range(2):
        urls = [image_server.url(f"/img/{k * 4 + r}.jpg") for r in range(4)]
        pq.write_table(pa.table({"url": urls}), meta / f"part-{k}.parquet")
    manifest = _manifest(tmp_path, {"url_list": str(meta / "part-*.parquet")})
    assert _cli("run", str(manifest), "--stage", "download", cwd=tmp_path).returncode == 0
    marker = tmp_path / "run" / "images" / "_done" / "000001.json"
    before = marker.read_bytes()
    (meta / "part-0.parquet").touch()
    again = _cli("run", str(manifest), "--stage", "download", cwd=tmp_path)
    assert again.returncode == 0 and marker.read_bytes() == before, again.stderr
    record = json.loads((tmp_path / "run" / "images" / "_input" / "record.json").read_text())
    assert record["files"][0]["mtime_ns"] == (meta / "part-0.parquet").stat().st_mtime_ns
    pq.write_table(
        pa.table({"url": [image_server.url(f"/img/{r}.jpg") for r in range(5)]}), meta / "part-1.parquet"
    )
    edited = _cli("plan", str(manifest), cwd=tmp_path)
    assert edited.returncode == 2
    assert edited.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "part-1.parquet changed (size" in edited.stderr and "--force" in edited.stderr
    pq.write_table(pa.table({"url": [image_server.url("/img/9.jpg")]}), meta / "part-2.parquet")
    added = _cli("run", str(manifest), "--stage", "download", cwd=tmp_path)
    assert added.returncode == 2 and "part-2.parquet was added" in added.stderr
    assert marker.read_bytes() == before  # nothing written by the refused runs
    forced = _cli("run", str(manifest), "--stage", "download", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    success = json.loads((tmp_path / "run" / "images" / "_SUCCESS.json").read_text())
    assert success["units"] == 3 and success["counts"]["ok"] == 10


def test_validate_refuses_a_csv_that_is_not_utf8(tmp_path):
    """`validate` reads the text columns of text formats through (what `run` would refuse)."""
    rows = "url,caption\n" + "".join(f"http://127.0.0.1:9/{i}.jpg,fine {i}\n" for i in range(2000))
    (tmp_path / "urls.csv").write_bytes(rows.encode() + b"http://127.0.0.1:9/x.jpg,caf\xe9 latin-1\n")
    manifest = _manifest(tmp_path, {"url_list": "urls.csv", "caption_col": "caption"})
    done = _cli("validate", str(manifest), cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert "urls.csv" in last and "'caption'" in last and "UTF-8" in last


def test_url_list_errors_name_the_folder_or_glob(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageConfigError, match=r"empty: no table files"):
        load_url_table(DownloadConfig(url_list=tmp_path / "empty"), tmp_path / "run")
    with pytest.raises(StageConfigError, match=r"nothing-\*\.parquet: no table files"):
        load_url_table(DownloadConfig(url_list=tmp_path / "nothing-*.parquet"), tmp_path / "run")
    with pytest.raises(ValueError, match="save_additional_columns: 'status' is already a column"):
        DownloadConfig(url_list=tmp_path / "empty", save_additional_columns=["status"])
