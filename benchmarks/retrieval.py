"""Benchmark: caption-bank search at scale, every variant measured in this one run, one table.

    .venv/bin/python benchmarks/retrieval.py [--device cpu|cuda] [--quick] [--work DIR] [--images 10000]

Banks (synthetic, seeded, clustered like real embeddings: 4096 centres plus noise, unit length) are
written as fp16 chunk files exactly as the caption stage caches them, 100k rows at a time (never the
whole bank in float32): 100k and 1M captions at 768-d, 10M at 64-d (`--quick`: 20k/100k at 768-d,
1M at 64-d). Images: noisy copies of random bank rows.

Per bank:
  exact   ours: blocked exact search (captioning/bank_search.py), 2 rank processes started together,
          each searching half of the images, 1 thread each, memory-mapped bank shared by both;
  ivfpq   the cached faiss IVF-PQ index (build time in the note), same 2 ranks, recall@20 against exact;
  faiss   the old way, on the 1M x 768 bank only: float32 bank in RAM + faiss IndexFlatIP, one process
          with 2 threads searching all images (a rank of the old code holds the whole bank whatever
          its share of images, so 2 ranks hold 2 x this; the sum is computed, not measured: two such
          ranks would need ~12 GB).
Memory: PSS (pages shared with the other rank through the page cache count half in each) and RSS
from /proc/<pid>/smaps_rollup sampled every 0.1 s; "sum PSS" is the peak of the ranks' summed PSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

CHUNK = 100_000
CENTRES = 4096
K, THRESHOLD = 20, 0.271


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_bank(folder: Path, rows: int, dim: int, seed: int = 0) -> Path:
    """fp16 chunks `000000.npy`.. of a clustered unit-vector bank; reused if already complete."""
    done = folder / "_complete.json"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    centres = _unit(np.random.default_rng(seed).standard_normal((CENTRES, dim), dtype=np.float32))
    for i, start in enumerate(range(0, rows, CHUNK)):
        rng = np.random.default_rng([seed, i])
        n = min(CHUNK, rows - start)
        block = centres[rng.integers(0, CENTRES, n)]
        block += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(0.6 / np.sqrt(dim))
        tmp = folder / f".{i:06d}.npy.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, _unit(block).astype(np.float16))
        tmp.rename(folder / f"{i:06d}.npy")
    done.write_text(json.dumps({"rows": rows, "dim": dim}))
    return folder


def make_queries(bank_folder: Path, n: int, seed: int = 1) -> Path:
    from captioning.bank_search import BankVectors

    path = bank_folder / f"queries-{n}.npy"
    if not path.exists():
        bank = BankVectors(sorted(bank_folder.glob("[0-9]*.npy")))
        rng = np.random.default_rng(seed)
        rows = bank.gather(np.sort(rng.choice(bank.rows, n, replace=False))).astype(np.float32)
        rows += rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(0.5 / np.sqrt(bank.dim))
        np.save(path, _unit(rows))
    return path


# --- one rank -----------------------------------------------------------------------------------


def worker(args) -> None:
    import faiss
    import torch

    from captioning.bank_search import ApproximateSearch, BankVectors, ExactSearch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    queries = np.load(args.queries)
    mine = queries[args.rank :: args.world]
    paths = sorted(Path(args.bank).glob("[0-9]*.npy"))
    start = time.monotonic()
    if args.method == "faiss":  # the old code path: float32 chunks concatenated, then faiss copies them
        vectors = np.concatenate([np.load(p).astype(np.float32) for p in paths])
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        scores, ids = index.search(mine, K)
    elif args.method == "exact":
        scores, ids = ExactSearch(BankVectors(paths), args.device, args.memory_mib).search(mine, K)
    else:
        scores, ids = ApproximateSearch(BankVectors(paths), Path(args.index), args.nprobe).search(mine, K)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - start
    np.save(args.out, ids)
    print(json.dumps({"seconds": seconds, "captions": int((scores > THRESHOLD).sum())}), flush=True)


# --- the parent: start ranks together, sample their memory ---------------------------------------


def _rollup(pid: int) -> tuple[int, int]:
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return pss, rss


def run_ranks(method: str, bank: Path, queries: Path, world: int, threads: int, args, **extra) -> dict:
    outs = [bank / f"ids-{method}-{r}.npy" for r in range(world)]
    base = [sys.executable, __file__, "--worker", method, "--bank", str(bank), "--queries", str(queries)]
    base += ["--threads", str(threads), "--device", args.device, "--memory-mib", str(args.memory_mib)]
    for key, value in extra.items():
        base += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            base + ["--rank", str(r), "--world", str(world), "--out", str(outs[r])],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    peak = {"pss": [0] * world, "rss": [0] * world, "sum": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = [_rollup(p.pid) for p in procs]
            for r, (pss, rss) in enumerate(now):
                peak["pss"][r] = max(peak["pss"][r], pss)
                peak["rss"][r] = max(peak["rss"][r], rss)
            peak["sum"] = max(peak["sum"], sum(p for p, _ in now))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{method} rank failed with code {p.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    seconds = time.monotonic() - start
    stop.set()
    sampler.join()
    ids = np.empty((len(np.load(queries, mmap_mode="r")), K), np.int64)
    for r, path in enumerate(outs):
        ids[r::world] = np.load(path)
    return {
        "seconds": seconds,
        "search_seconds": max(r["seconds"] for r in results),
        "pss": max(peak["pss"]) / 1024,
        "rss": max(peak["rss"]) / 1024,
        "sum": peak["sum"] / 1024,
        "ids": ids,
    }


def build_index(bank: Path) -> tuple[Path, float]:
    import faiss

    from captioning.bank_search import BankVectors, build_ivfpq, ivfpq_params

    faiss.omp_set_num_threads(2)
    vectors = BankVectors(sorted(bank.glob("[0-9]*.npy")))
    nlist, m = ivfpq_params(vectors.rows, vectors.dim, None, None)
    path = bank / f"ivfpq-{nlist}-{m}.faiss"
    if path.exists():
        return path, float("nan")
    start = time.monotonic()
    tmp = bank / f".{path.name}.tmp"
    build_ivfpq(vectors, tmp)
    tmp.rename(path)
    return path, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller banks and 1000 images (smoke run)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--banks", default=None, help="only these banks, e.g. 1000000x768,10000000x64")
    parser.add_argument("--work", type=Path, default=None, help="folder for the banks (default: a temp dir)")
    parser.add_argument("--memory-mib", type=int, default=2048)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--worker", default=None)
    for name in ("bank", "queries", "out", "index"):
        parser.add_argument(f"--{name}", default=None)
    for name in ("rank", "world", "threads"):
        parser.add_argument(f"--{name}", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        args.method = args.worker
        return worker(args)

    from captioning.bank_search import recall_at_k

    images = args.images or (1000 if args.quick else 10_000)
    sizes = [(20_000, 768), (100_000, 768), (1_000_000, 64)] if args.quick else None
    sizes = sizes or [(100_000, 768), (1_000_000, 768), (10_000_000, 64)]
    baseline_size = sizes[1]
    if args.banks:
        sizes = [tuple(int(x) for x in bank.split("x")) for bank in args.banks.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    cores = os.cpu_count()
    load = os.getloadavg()[0]
    print(f"device {args.device}, {cores} cores, load average {load:.2f} at start, {images} images, k={K}")
    rows = []
    for n, dim in sizes:
        bank = make_bank(work / f"bank-{n}x{dim}", n, dim)
        queries = make_queries(bank, images)
        bank_mib = n * dim * 2 / 2**20
        exact = run_ranks("exact", bank, queries, 2, 1, args)
        rows.append((f"{n:,} x {dim}", "exact (ours)", exact, "", f"bank {bank_mib:.0f} MiB fp16"))
        if (n, dim) == baseline_size:
            old = run_ranks("faiss", bank, queries, 1, 2, args)
            old["sum"] = 2 * old["pss"]
            recall = recall_at_k(old["ids"], exact["ids"])
            rows.append(
                (
                    f"{n:,} x {dim}",
                    "faiss flat (today)",
                    old,
                    f"{recall:.4f}",
                    "1 proc x 2 threads; sum = 2 x",
                )
            )
        if args.device == "cpu":
            index, build_s = build_index(bank)
            approx = run_ranks("ivfpq", bank, queries, 2, 1, args, index=index, nprobe=args.nprobe)
            recall = recall_at_k(approx["ids"], exact["ids"])
            rows.append(
                (
                    f"{n:,} x {dim}",
                    f"ivfpq {index.stem[6:]}",
                    approx,
                    f"{recall:.4f}",
                    f"build {build_s:.0f} s",
                )
            )
    header = f"{'bank':>16} {'method':>20} {'seconds':>8} {'images/s':>9} {'PSS/rank':>9} {'RSS/rank':>9} "
    header += f"{'sum PSS':>9} {'recall@20':>9}  note"
    print(header)
    for bank, method, r, recall, note in rows:
        print(
            f"{bank:>16} {method:>20} {r['seconds']:>8.1f} {images / r['seconds']:>9.0f} {r['pss']:>8.0f}M "
            f"{r['rss']:>8.0f}M {r['sum']:>8.0f}M {recall:>9}  {note}"
        )
    print(f"memory in MiB; load average {os.getloadavg()[0]:.2f} at the end; banks in {work}")


if __name__ == "__main__":
    main()
