"""Benchmark: bare img2dataset vs our download stage on the same local URL list, in one run.

    .venv/bin/python benchmarks/download.py [--urls 3000] [--repeats 2]

Serves generated images on 127.0.0.1, runs bare `img2dataset.download` and our stage with the
same options (alternating, `--repeats` times each, fresh output folders) and prints both wall times
and the ratio ours / bare. Target: ours <= 1.1x.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from examples.image_server import ImageServer  # noqa: E402
from stages import download  # noqa: E402
from stages.base import RunContext  # noqa: E402

OPTIONS = dict(image_size=64, samples_per_shard=1000, processes=2, threads=32)


def run_bare(url_list: Path, out: Path) -> None:
    import img2dataset

    img2dataset.download(
        url_list=str(url_list),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_folder=str(out),
        output_format="webdataset",
        oom_shard_count=6,
        image_size=OPTIONS["image_size"],
        resize_mode="border",
        encode_format="jpg",
        number_sample_per_shard=OPTIONS["samples_per_shard"],
        processes_count=OPTIONS["processes"],
        thread_count=OPTIONS["threads"],
        extract_exif=False,
        compute_hash="sha256",
        enable_wandb=False,
    )


def run_ours(url_list: Path, out: Path) -> None:
    cfg = download.DownloadConfig(url_list=url_list, caption_col="caption", label_col="label", **OPTIONS)
    result = download.run(cfg, RunContext(root=out))
    assert result.is_complete and result.counts["failed"] == 0, result


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    times: dict[str, list[float]] = {"bare img2dataset": [], "our download stage": []}
    with ImageServer() as server:
        urls = [server.url(f"/img/{i}.jpg") for i in range(args.urls)]
        url_list = work / "urls.parquet"
        pq.write_table(
            pa.table(
                {
                    "url": urls,
                    "caption": [f"c{i}" for i in range(args.urls)],
                    "label": [i % 10 for i in range(args.urls)],
                }
            ),
            url_list,
        )
        for repeat in range(args.repeats):
            for name, fn in (("bare img2dataset", run_bare), ("our download stage", run_ours)):
                out = work / f"{name.split()[0]}-{repeat}"
                times[name].append(timed(fn, url_list, out))
                shutil.rmtree(out)
    shutil.rmtree(work)
    bare, ours = (statistics.median(times[k]) for k in times)
    print(f"\n{args.urls} URLs on 127.0.0.1, {OPTIONS}, median of {args.repeats}")
    print(f"{'variant':<22}{'wall s':>10}{'images/s':>12}{'ratio':>8}")
    for name, value in (("bare img2dataset", bare), ("our download stage", ours)):
        print(f"{name:<22}{value:>10.2f}{args.urls / value:>12.1f}{value / bare:>8.2f}")
    print(f"target: ours <= 1.10x bare -> {'met' if ours <= 1.1 * bare else 'NOT met'}")


if __name__ == "__main__":
    main()
