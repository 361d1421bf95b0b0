"""Hostile inputs (issue 15): the download stage with real img2dataset against HostileImageServer
(tests/helpers/flaky_server.py) on 127.0.0.1, and the caption bank's bound on a caption's length.

One download run serves every download test: four good pictures, a 16000 x 16000 PNG (above the
default max_image_area), an empty body, two trickling servers and a 16-bit grey PNG.
"""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards.reader import iter_samples
from stages.caption.bank import MAX_CAPTION_CHARS, read_bank
from stages.errors import StageConfigError
from tests.conftest import cli_env, write_manifest, write_url_table
from tests.helpers.flaky_server import HostileImageServer, grey16_gradient

DEADLINE_S = 2
BIG_SIDE = 16000  # 2.56e8 pixels > the default max_image_area 1e8; 768 MB once decoded
PATHS = [f"/img/{i}.jpg" for i in range(4)]
PATHS += ["/big.png", "/empty.jpg", "/trickle-body.jpg", "/trickle-head.jpg", "/grey16.png"]

# runs the CLI and records the peak RSS of its process tree (RUSAGE_CHILDREN: the largest waited-for
# descendant, img2dataset's worker processes included) and, as the baseline, its own RSS once it
# has imported what a worker imports (meanwhile, as that takes seconds)
_MEASURED_CLI = """
import json, resource, subprocess, sys
cli = subprocess.Popen([sys.executable, "-m", "pipeline", *sys.argv[2:]])
import img2dataset, stages.download.guards
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = cli.wait()
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[1], "w").write(json.dumps({"baseline_kib": baseline, "peak_kib": peak}))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    with HostileImageServer(big_side=BIG_SIDE) as server:
        write_url_table(folder / "urls.parquet", [server.url(p) for p in PATHS])
        manifest = write_manifest(folder, {"max_failed_fraction": 1.0, "deadline_s": DEADLINE_S})
        result = subprocess.run(
            [sys.executable, "-c", _MEASURED_CLI, str(folder / "rss.json"), "run", str(manifest)],
            cwd=folder,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        trickles = list(server.trickles)
    assert result.returncode == 0, result.stderr
    root = folder / "run" / "images"
    status = pa.concat_tables([pq.read_table(p) for p in sorted(root.glob("0*.parquet"))]).to_pylist()
    return {
        "counts": json.loads((root / "_SUCCESS.json").read_text())["counts"],
        "status": {int(row["key"]): row for row in status},
        "samples": {s["__key__"]: s for s in iter_samples(sorted(root.glob("*.tar")))},
        "rss": json.loads((folder / "rss.json").read_text()),
        "trickles": dict(trickles),
    }


def test_the_other_rows_succeed(hostile_run):
    counts = hostile_run["counts"]
    assert (counts["ok"], counts["failed"]) == (5, 4)
    assert sorted(hostile_run["samples"]) == [f"{r:09d}" for r in (0, 1, 2, 3, 8)]
    assert counts["failed_by_reason"] == {
        "image too large": 1,
        "empty response body": 1,
        "deadline exceeded": 2,
    }


def test_a_picture_above_max_image_area_is_refused_from_its_header_without_decoding(hostile_run):
    row = hostile_run["status"][PATHS.index("/big.png")]
    assert row["status"] == "failed_to_resize"
    assert row["error_message"].startswith(
        f"image area too large: {BIG_SIDE} x {BIG_SIDE} pixels in the header (not decoded)"
    )
    # decoded, the picture alone takes 768 MB in a worker (img2dataset 1.47 decodes, then checks);
    # a normal run grows ~150 MB above the baseline
    rss = hostile_run["rss"]
    grown_mb = (rss["peak_kib"] - rss["baseline_kib"]) / 1024
    assert grown_mb < BIG_SIDE * BIG_SIDE * 3 / 2**20 / 2, rss


def test_a_trickling_server_fails_at_the_deadline(hostile_run):
    for path in ("/trickle-body.jpg", "/trickle-head.jpg"):
        row = hostile_run["status"][PATHS.index(path)]
        assert (
            row["error_message"]
            == f"deadline exceeded: no complete response within deadline_s={DEADLINE_S} s"
        )
        seconds = hostile_run["trickles"][path]  # the server sees the cut: a byte every 0.1 s until then
        assert seconds is not None and DEADLINE_S - 1 < seconds < DEADLINE_S + 3, (path, seconds)


def test_an_empty_body_has_its_own_reason(hostile_run):
    row = hostile_run["status"][PATHS.index("/empty.jpg")]
    assert (row["status"], row["error_message"]) == ("failed_to_resize", "empty response body")


def test_a_16_bit_grey_png_is_stored_scaled_to_8_bit(hostile_run):
    stored = cv2.imdecode(np.frombuffer(hostile_run["samples"]["000000008"]["jpg"], np.uint8), 0)
    source = grey16_gradient()  # 64 x 48, 0 at the left to 65535 at the right
    height = 32 * source.shape[0] // source.shape[1]  # border mode: 32 x 24 between white bands
    top = (32 - height) // 2
    expected = cv2.resize((source / 257).round().astype(np.uint8), (32, height), interpolation=cv2.INTER_AREA)
    picture = stored[top : top + height].astype(int)
    assert picture[:, 0].max() < 20 and picture[:, -1].min() > 235  # not saturated to 255
    assert np.abs(picture - expected).max() <= 8


def test_safe_download_defaults_and_fingerprint(tmp_path):
    from stages.download import DownloadConfig

    write_url_table(tmp_path / "urls.parquet", ["http://127.0.0.1:9/a.jpg"])
    cfg = DownloadConfig(url_list=tmp_path / "urls.parquet")
    assert (cfg.max_image_area, cfg.deadline_s) == (1.0e8, 30.0)
    settings = cfg.fingerprint_settings()
    assert settings["max_image_area"] == 1.0e8 and "deadline_s" not in settings
    assert DownloadConfig(url_list=tmp_path / "urls.parquet", max_image_area=None).max_image_area is None


@pytest.mark.parametrize("suffix", [".txt", ".parquet"])
def test_a_bank_caption_longer_than_the_bound_is_an_error_naming_file_and_line(tmp_path, suffix):
    captions = ["a photo of a cat", "x" * MAX_CAPTION_CHARS, "y" * (MAX_CAPTION_CHARS + 1), "a dog"]
    bank = tmp_path / f"bank{suffix}"
    if suffix == ".txt":
        bank.write_text("\r\n".join(captions) + "\n")
        where = "line 3"
    else:
        pq.write_table(pa.table({"caption": captions}), bank)
        where = "the caption in row 2 of column 'caption'"
    with pytest.raises(
        StageConfigError, match=f"caption bank {bank}: {where} is longer than 10000 characters"
    ):
        read_bank(bank, "caption")
    bank_ok = tmp_path / f"ok{suffix}"
    if suffix == ".txt":
        bank_ok.write_text("\r\n".join(captions[:2] + captions[3:]))
    else:
        pq.write_table(pa.table({"caption": captions[:2] + captions[3:]}), bank_ok)
    assert read_bank(bank_ok, "caption") == captions[:2] + captions[3:]
