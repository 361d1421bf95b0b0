"""Benchmark: the download stage at LAION-400M's shape: 32 parquet files, 50M rows, 400,000 units, 64 ranks.

    .venv/bin/python benchmarks/scale.py [--rows 50000000] [--units 400000] [--work /tmp/mcip-scale]

Generates a LAION-shaped URL folder (32 parquet files with SAMPLE_ID, URL, TEXT, HEIGHT, WIDTH,
LICENSE, NSFW, similarity; every URL points at a local image server on 127.0.0.1; one file written,
the other 31 hard links of it) and a run root where every unit is done (real markers, small real
shards hard-linked) except one unit for each of ranks 0, 31 and 63 of WORLD_SIZE=64. Each of those
ranks then runs `python -m pipeline run --stage download` in its own process and downloads its one
shard. Then, as when the other 61 ranks have finished (their rank files written), rank 63 runs
its shard once more and, the last to finish, makes the whole-stage check (every marker read once,
the marker summary written, `_SUCCESS.json`); then `status`, `plan` and a nothing-to-do `run` (one
process, every unit) run on the root, and `status` once more without the summary. The same is
measured with a 50k-row table (400 units) beside it, and one table is printed:

- start-up: seconds from the process's start to img2dataset's first call ("shard(s) to download")
- peak RSS of the stage's process (VmHWM; img2dataset's worker processes are the same for every
  table and are not the rank's) and peak PSS of the whole process tree, workers included (sampled)
- file operations under the run root and the URL folder (strace -f -e trace=%file), and per own unit

Targets (issue 19): a rank's peak RSS with the 50M-row table within 1.2x of the 50k-row one; a rank's
start-up under 5 s with 400,000 units and its file operations proportional to its own units; `status`
under 10 s. The URL files' record (each file hashed once per run root) is timed on its own row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from examples.image_server import ImageServer, generated_jpeg  # noqa: E402
from shards.tars import write_tar_atomic  # noqa: E402
from stages.base import RunContext, plan_units  # noqa: E402
from stages.download import DownloadConfig, load_url_table, settings_of  # noqa: E402

WORLD, RANKS, FILES = 64, (0, 31, 63), 32
LINKS_PER_FILE = 60_000
SETTINGS = {"image_size": 32, "processes": 1, "threads": 8, "url_col": "URL", "caption_col": "TEXT"}
EXTRA = ["NSFW", "similarity", "LICENSE"]


def laion_file(path: Path, rows: int, first: int, server: ImageServer) -> None:
    """One LAION-shaped parquet file (default row groups of pyarrow: 1Mi rows)."""
    ids = np.arange(first, first + rows)
    urls = pa.array([server.url(f"/img/{i}.jpg") for i in ids.tolist()])
    text = pa.array([f"a photo number {i} of something in a place" for i in ids.tolist()])
    pq.write_table(
        pa.table(
            {
                "SAMPLE_ID": ids,
                "URL": urls,
                "TEXT": text,
                "HEIGHT": np.full(rows, 96),
                "WIDTH": np.full(rows, 96),
                "LICENSE": pa.array(["?"] * rows),
                "NSFW": pa.array(["UNLIKELY"] * rows),
                "similarity": np.linspace(0.3, 0.4, rows),
            }
        ),
        path,
    )


def make_url_folder(folder: Path, rows: int, server: ImageServer) -> None:
    folder.mkdir(parents=True)
    per_file = rows // FILES
    laion_file(folder / "part-00000.parquet", per_file, 0, server)
    for k in range(1, FILES):  # same bytes, other names: the global numbering still counts them all
        os.link(folder / "part-00000.parquet", folder / f"part-{k:05d}.parquet")


def manifest_for(folder: Path, urls: Path, per_shard: int) -> Path:
    download = {**SETTINGS, "url_list": str(urls), "samples_per_shard": per_shard}
    download["save_additional_columns"] = EXTRA
    path = folder / "manifest.yaml"
    path.write_text(
        yaml.safe_dump({"run": {"root": str(folder / "run"), "seed": 0}, "stages": {"download": download}})
    )
    return path


def make_done_units(manifest: Path, units: int, per_shard: int, pending: set[int]) -> float:
    """Every unit done but `pending`: one real shard (tar + status parquet) hard-linked for all, and
    a real marker per unit (the template's, renamed). Returns the seconds the record took."""
    data = yaml.safe_load(manifest.read_text())
    root = Path(data["run"]["root"])
    cfg = DownloadConfig.model_validate(data["stages"]["download"], context={"base_dir": manifest.parent})
    started = time.monotonic()
    urls = load_url_table(cfg, root)  # the record: every file hashed once
    record_s = time.monotonic() - started
    out = root / "images"
    names = [f"{i:06d}" for i in range(units)]
    plan = plan_units("download", out, names[:1], settings_of(cfg, urls), RunContext(root))
    keys = [f"{r:09d}" for r in range(per_shard)]
    write_tar_atomic(out / "template.tar", [(k, {"jpg": generated_jpeg(1), "json": b"{}"}) for k in keys])
    pq.write_table(pa.table({"key": keys, "status": ["success"] * per_shard}), out / "template.parquet")
    template = {"counts": {"rows": per_shard, "ok": per_shard, "failed": 0, "failed_by_reason": {}}}
    template.update({"kind": "base", "rank": 0, "tar_bytes": (out / "template.tar").stat().st_size})
    template.update({"tar_sha256": "0" * 64, "seconds": 1.0})
    plan.mark_done("000000", template, outputs=[out / "template.tar", out / "template.parquet"])
    marker = json.loads((out / "_done" / "000000.json").read_text())
    tar_rec, parquet_rec = marker["outputs"]["template.tar"], marker["outputs"]["template.parquet"]
    for i, unit in enumerate(names):
        if i % LINKS_PER_FILE == 0:  # ext4 allows 65,000 links to one inode: a copy, mtime kept
            for suffix in ("tar", "parquet"):
                (out / f"source.{suffix}").unlink(missing_ok=True)  # not through the old links
                shutil.copy2(out / f"template.{suffix}", out / f"source.{suffix}")
        if i in pending:
            continue
        os.link(out / "source.tar", out / f"{unit}.tar")
        os.link(out / "source.parquet", out / f"{unit}.parquet")
        marker.update(unit=unit, outputs={f"{unit}.tar": tar_rec, f"{unit}.parquet": parquet_rec})
        (out / "_done" / f"{unit}.json").write_text(json.dumps(marker))
    for unit in ("000000",) if 0 in pending else ():
        (out / "_done" / f"{unit}.json").unlink()
    for name in ("template.tar", "template.parquet", "source.tar", "source.parquet"):
        (out / name).unlink()
    return record_s


class Sampler(threading.Thread):
    """Peak PSS of a process tree and the peak RSS of its first process (VmHWM), sampled from /proc
    every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_pss_kb, self.hwm_kb, self.done = pid, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(p) for p in _tree(self.pid)))
            self.hwm_kb = max(self.hwm_kb, _hwm_kb(self.pid))


def _hwm_kb(pid: int) -> int:
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return 0
    return int(match.group(1)) if match else 0


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        p = queue.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                queue += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def _pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    match = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def run_cli(args: list[str], env: dict[str, str], strace_to: Path | None = None) -> dict[str, float]:
    """Run the CLI; seconds, start-up seconds, peak RSS and PSS (MB)."""
    command = [sys.executable, "-m", "pipeline", *args]
    if strace_to:
        command = ["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(strace_to), *command]
    started = time.monotonic()
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    sampler = Sampler(process.pid)
    sampler.start()
    startup, lines = None, []
    for line in process.stderr:
        lines.append(line)
        if startup is None and "shard(s) to download" in line:
            startup = time.monotonic() - started
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    sampler.done.set()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({process.returncode}):\n{''.join(lines[-20:])}")
    return {
        "seconds": time.monotonic() - started,
        "startup_s": startup if startup is not None else float("nan"),
        "rss_mb": sampler.hwm_kb / 1024,  # the stage's own process (img2dataset's workers: in PSS)
        "tree_rss_mb": usage.ru_maxrss / 1024,
        "pss_mb": sampler.peak_pss_kb / 1024,
    }


def file_ops(log: Path, roots: list[Path]) -> int:
    """Lines of an strace %file log that name a path under one of `roots`."""
    needles = [str(r) for r in roots]
    with open(log, errors="replace") as handle:
        return sum(1 for line in handle if any(n in line for n in needles))


def measure(work: Path, rows: int, units: int, server: ImageServer) -> list[dict]:
    per_shard = max(rows // units, 1)
    folder = work / f"rows-{rows}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    make_url_folder(folder / "meta", rows, server)
    manifest = manifest_for(folder, folder / "meta", per_shard)
    record_s = make_done_units(manifest, units, per_shard, set(RANKS))
    root = folder / "run"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", MCIP_CACHE_DIR=str(folder / "cache"))
    rows_out = [{"what": "URL files' record (once per run root)", "seconds": record_s}]
    for rank in RANKS:
        rank_env = {**env, "RANK": str(rank), "WORLD_SIZE": str(WORLD)}
        figures = run_cli(["run", str(manifest), "--stage", "download"], rank_env)
        _undo_unit(root, rank)
        log = folder / f"strace-{rank}.log"
        run_cli(["run", str(manifest), "--stage", "download"], rank_env, strace_to=log)
        ops = file_ops(log, [root, folder / "meta"])
        own = len(range(rank, units, WORLD))
        rows_out.append({"what": f"rank {rank}/{WORLD} run (1 shard)", **figures, "ops": ops, "own": own})
    _other_ranks_done(root, units)  # as when the other 61 ranks have finished their shares
    _undo_unit(root, RANKS[-1])
    rank_env = {**env, "RANK": str(RANKS[-1]), "WORLD_SIZE": str(WORLD)}
    last = run_cli(["run", str(manifest), "--stage", "download"], rank_env)
    rows_out.append({"what": f"rank {RANKS[-1]}/{WORLD}, last to finish: + whole-stage check", **last})
    for name, args in (
        ("status", ["status"]),
        ("plan", ["plan"]),
        ("run, nothing to do (1 process)", ["run", "--stage", "download"]),
    ):
        rows_out.append({"what": name, **run_cli([args[0], str(manifest), *args[1:]], env)})
    shutil.rmtree(root / "logs" / "summaries")
    rows_out.append(
        {"what": "status, no summary (reads every marker)", **run_cli(["status", str(manifest)], env)}
    )
    return rows_out


def _other_ranks_done(root: Path, units: int) -> None:
    """The rank files (stages/base.py) of every rank but RANKS: their shares are done."""
    done = root / "images" / "_done"
    fingerprint = json.loads((done / f"{1:06d}.json").read_text())["fingerprint"]
    for rank in set(range(WORLD)) - set(RANKS):
        payload = {"fingerprint": fingerprint, "units": len(range(rank, units, WORLD)), "counts": {}}
        (done / "_ranks").mkdir(exist_ok=True)
        (done / "_ranks" / f"{WORLD}-{rank}.json").write_text(json.dumps(payload))


def _undo_unit(root: Path, unit_index: int) -> None:
    """Remove a unit's marker and files (and _SUCCESS) so the strace run does the same work again."""
    unit = f"{unit_index:06d}"
    for path in (
        root / "images" / "_done" / f"{unit}.json",
        root / "images" / f"{unit}.tar",
        root / "images" / f"{unit}.parquet",
        root / "images" / "_SUCCESS.json",
    ):
        path.unlink(missing_ok=True)


def print_table(results: dict[str, list[dict]]) -> None:
    print(
        "\n| table | what | seconds | start-up s | peak RSS MB | peak PSS MB | file ops | ops per own unit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for table, rows in results.items():
        for r in rows:
            ops = r.get("ops")
            per = f"{ops / r['own']:.2f} ({r['own']} own)" if ops is not None else ""
            memory = f"{_f(r.get('rss_mb'), 0)} | {_f(r.get('pss_mb'), 0)}"
            ops_text = ops if ops is not None else ""
            cells = [table, r["what"], f"{r['seconds']:.1f}", _f(r.get("startup_s")), memory, ops_text, per]
            print("| " + " | ".join(str(c) for c in cells) + " |")


def _f(value, digits: int = 2) -> str:
    return "" if value is None or value != value else f"{value:.{digits}f}"


def check_targets(results: dict[str, list[dict]]) -> None:
    big, small = results["big"], results["small"]
    for b, s in zip(big[1:4], small[1:4]):
        print(
            f"{b['what']}: RSS big/small {b['rss_mb'] / s['rss_mb']:.2f}x (target <= 1.2x), "
            f"start-up {b['startup_s']:.2f} s (target < 5 s)"
        )
    marginal = [(b["ops"] - s["ops"]) / (b["own"] - s["own"]) for b, s in zip(big[1:4], small[1:4])]
    print(f"file operations per extra own unit: {', '.join(f'{m:.1f}' for m in marginal)} (own units only)")
    status = {r["what"]: r["seconds"] for r in big}
    print(
        f"status on the big root: {status['status']:.1f} s (target < 10 s); "
        f"{status['status, no summary (reads every marker)']:.1f} s where no summary was left"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000_000)
    parser.add_argument("--units", type=int, default=400_000)
    parser.add_argument("--small-rows", type=int, default=50_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mcip-scale"))
    args = parser.parse_args()
    if shutil.which("strace") is None:
        raise SystemExit("strace is needed for the file-operation counts (apt-get install strace)")
    small_units = max(args.small_rows * args.units // args.rows, len(RANKS) * WORLD)
    results = {}
    with ImageServer() as server:
        for label, rows, units in (("small", args.small_rows, small_units), ("big", args.rows, args.units)):
            print(f"{label}: {rows} rows in {FILES} files, {units} units ...", flush=True)
            results[label] = measure(args.work, rows, units, server)
    results = {
        f"{args.rows // 1_000_000}M rows, {args.units} units": results["big"],
        f"{args.small_rows // 1000}k rows, {small_units} units": results["small"],
        **results,
    }
    print_table({k: v for k, v in results.items() if k not in ("big", "small")})
    check_targets(results)


if __name__ == "__main__":
    main()
