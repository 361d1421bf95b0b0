"""Benchmark: the search product, every variant measured in this one run, one table.

    .venv/bin/python benchmarks/search.py [--device cpu|cuda] [--rows 100000,1000000] [--dim 128]
                                          [--queries 60] [--clients 4] [--images 2000] [--work DIR]

Search: synthetic collections (seeded, clustered unit vectors, fp16 shard files of 100k rows laid
out exactly as the index stage writes them, with their metadata parquet) of each `--rows` size;
per size an exact index and an IVF-PQ index (stages/index/build.py, parameters from a 1 GiB budget,
nprobe tuned to recall@10 >= 0.95 on 500 held-out vectors), each served by `serve`'s app (uvicorn
on 127.0.0.1) and queried over HTTP by `--clients` threads: text queries (`GET /api/search?text=`,
through a small CLIP's text tower) and image queries (`POST /api/search/image`, a JPEG through its
image tower). Reported: queries/s, p50/p99 latency, recall@10 of IVF-PQ's answers against the exact
index's answers to the same queries over the API, and the build time.

Embedding: `--images` pictures in 4 image shards; the index stage's embedding loop
(stages/index/embed.py: DataLoader workers, each tar read once by the worker that takes it, its
files and markers written) against the evaluate stage's (stages/evaluate/embed.py: the tars'
headers read, then one file read per picture) on the same shards, same model, stages' default
batch size 256 and 2 workers, model loading included in both. Two models: a 6-layer ViT, where
the forward pass is ~95% of a run on a CPU, and a 2-layer one, where the loops' own work (reading,
decoding, transforms, writing) is a large share, as it is on a GPU. One untimed run of each first (page
cache, imports), then `--repeats` pairs, the order alternating (index first, then evaluate first),
so a change of load on a shared machine falls on both; the speed ratio is taken per pair and the
median, the spread (min-max) of the pairs' ratios, the ratio of the best runs and the load average
are reported. Each run's time is also split into the model's (`encode_images`, the same work in
both loops and what load slows most) and the rest (loading, waiting for batches, the loops' own
work, writes on the main thread), which is the loops' difference and far less sensitive to load,
and the CPU time of the run (the main process and its DataLoader workers): the work each loop does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

CHUNK = 100_000
CENTRES = 4096
WORDS = "red green blue yellow purple circle square triangle star small large dark light".split()


def make_collection(folder: Path, model: str, rows: int, dim: int, seed: int = 0) -> list[str]:
    """`meta/<shard>.parquet` and `<model>/vectors/<shard>.npy` as the index stage writes them."""
    import pyarrow as pa

    from shards.tables import write_parquet_atomic
    from stages.index.embed import META_SCHEMA

    rng0 = np.random.default_rng(seed)
    centres = rng0.standard_normal((CENTRES, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    shards = []
    for i, start in enumerate(range(0, rows, CHUNK)):
        unit, n = f"{i:06d}", min(CHUNK, rows - start)
        shards.append(unit)
        path = folder / model / "vectors" / f"{unit}.npy"
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])
        block = centres[rng.integers(0, CENTRES, n)] + rng.standard_normal((n, dim), dtype=np.float32) * (
            0.6 / np.sqrt(dim)
        )
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        keys = [f"{start + j:09d}" for j in range(n)]
        table = {
            "key": keys,
            "url": [f"http://example.com/{k}.jpg" for k in keys],
            "alt": [f"picture {k}" for k in keys],
            "caption": [f"a {WORDS[j % len(WORDS)]} thing" for j in range(n)],
            "captions": [[_phrase(start + j), _phrase(start + j + 7)] for j in range(n)],
            "shard": [unit] * n,
            "offset": [0] * n,
            "size": [0] * n,
        }
        write_parquet_atomic(
            pa.Table.from_pydict(table, schema=META_SCHEMA), folder / "meta" / f"{unit}.parquet"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, block.astype(np.float16))
    return shards


def _phrase(n: int) -> str:
    """One of 2,197 distinct captions: the caption set whose texts tune the index for text queries."""
    w = len(WORDS)
    return f"a {WORDS[n % w]} {WORDS[(n // w) % w]} {WORDS[(n // w // w) % w]}"


def build(root: Path, name: str, model: dict, shards: list[str], kind: str, device: str):
    """The index stage's build unit for one model over existing shard files; returns (cfg, card)."""
    from stages.base import RunContext, UnitPlan
    from stages.index import IndexConfig, build_unit
    from stages.index.build import build_model_index

    cfg = IndexConfig(
        name=name, model=model["arch"], config_dir=model["configs"], kind=kind, memory_mib=1024,
        models=[{"name": "m", "checkpoint": str(model["checkpoint"])}], recall_sample=500, device=device,
        captions="alt", texts=True,
    )  # fmt: skip
    folder = root / "index" / name
    plan = UnitPlan(folder, "bench", {"seed": 0}, [build_unit("m")], {}, [build_unit("m")])
    build_model_index(cfg, RunContext(root), plan, cfg.models[0], {u: root / f"{u}.tar" for u in shards})
    return cfg, plan.done[build_unit("m")]["card"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def query_load(url: str, queries: list, clients: int) -> tuple[float, list[float], list[list[str]]]:
    """(queries/s, latencies, result keys per query) of `queries` sent by `clients` threads."""
    import httpx

    local = threading.local()

    def one(query):
        client = getattr(local, "client", None) or httpx.Client(base_url=url, timeout=600)
        local.client = client
        started = time.perf_counter()
        if isinstance(query, bytes):
            answer = client.post("/api/search/image", params={"k": 10}, content=query)
        else:
            answer = client.get("/api/search", params={"text": query, "k": 10})
        answer.raise_for_status()
        return time.perf_counter() - started, [h["key"] for h in answer.json()["results"]["m"]]

    one(queries[0])  # warm-up: the model loads on the first query
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, queries))
    return len(queries) / (time.perf_counter() - started), [d[0] for d in done], [d[1] for d in done]


def search_rows(root: Path, model: dict, rows: int, dim: int, args) -> list[list[str]]:
    from captioning.bank_search import recall_at_k
    from stages.index.search import SearchIndex
    from stages.index.serve import make_app, running

    texts = [
        f"a {WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} number {i}" for i in range(args.queries)
    ]
    pictures = [jpeg(i) for i in range(args.queries)]
    out, answers = [], {}
    for kind in ("exact", "ivfpq"):
        name = f"bench-{rows}-{dim}"
        shards = make_collection(root / "index" / name, "m", rows, dim)
        started = time.perf_counter()
        cfg, card = build(root, name, model, shards, kind, args.device)
        built = time.perf_counter() - started
        index = SearchIndex(root, cfg, "m", card, args.device)
        with running(make_app({"m": index}, max_upload_bytes=1 << 20)) as url:
            for what, queries in (("text", texts), ("image", pictures)):
                qps, latency, keys = query_load(url, queries, args.clients)
                answers[kind, what] = keys
                recall = (
                    "1 (is exact)"
                    if kind == "exact"
                    else f"{_recall(recall_at_k, keys, answers['exact', what]):.3f}"
                )
                params = "" if kind == "exact" else _parameters(card)
                out.append(
                    [f"{rows:,}", kind, what, f"{qps:.1f}", f"{percentile(latency, 50):.0f}",
                     f"{percentile(latency, 99):.0f}", recall, f"{built:.0f} s", params]
                )  # fmt: skip
                print(" | ".join(out[-1]), flush=True)
    return out


def _parameters(card: dict) -> str:
    held_out = f"{card['recall_at_k']:.3f} pictures, {card.get('recall_at_k_texts', 0):.3f} texts"
    return f"nlist {card['nlist']}, m {card['pq_m']}, nprobe {card['nprobe']}; held-out recall {held_out}"


def _recall(recall_at_k, found: list[list[str]], exact: list[list[str]]) -> float:
    ids = {key: i for row in exact + found for i, key in enumerate({k for r in exact + found for k in r})}
    to_ids = lambda rows: np.array([[ids[k] for k in r] + [-1] * (10 - len(r)) for r in rows])  # noqa: E731
    return recall_at_k(to_ids(found), to_ids(exact))


def jpeg(n: int) -> bytes:
    from examples.image_server import generated_jpeg

    return generated_jpeg(n, size=96)


def embedding_rows(root: Path, model: dict, images: int, device: str, repeats: int) -> list[list[str]]:
    """images/s of the index stage's loop against the evaluate stage's on the same 4 shards."""
    from captioning.clip_models import load_clip
    from shards import markers
    from shards.tars import write_tar_atomic
    from stages.base import RunContext, plan_units
    from stages.evaluate.datasets import shard_images
    from stages.evaluate.embed import embed_images
    from stages.index import IndexConfig
    from stages.index.embed import embed_shards

    run = root / "embed-run"
    per = images // 4
    units = [f"{s:06d}" for s in range(4)]
    for s, unit in enumerate(units):
        samples = [
            (f"{n:09d}", {"jpg": jpeg(n), "txt": b"alt", "cls": b"0"}) for n in range(s * per, (s + 1) * per)
        ]
        info = write_tar_atomic(run / "images" / f"{unit}.tar", samples)
        marker = {"unit": unit, "fingerprint": "bench", "settings": {}, "counts": {"ok": per}, **info}
        markers.write_marker(run / "images", unit, marker)
    markers.write_success(run / "images", {"stage": "download", "fingerprint": "bench"})
    entry = {"name": "m", "checkpoint": str(model["checkpoint"])}
    cfg = IndexConfig(model=model["arch"], config_dir=model["configs"], models=[entry], device=device)

    def index() -> None:
        ctx = RunContext(run, force=True)  # every repeat embeds all shards again
        plan = plan_units("index", run / "index" / "bench", units, {"run": time.time()}, ctx)
        embed_shards(cfg, RunContext(run), plan, {u: run / "images" / f"{u}.tar" for u in units})

    def evaluate() -> None:
        clip = load_clip(model["arch"], model["checkpoint"], model["configs"], device)
        embed_images(clip, shard_images(run)[0], batch_size=256, num_workers=2)

    index(), evaluate()  # untimed: page cache, lazy imports
    times: dict[str, list[float]] = {"index": [], "evaluate": []}
    outside: dict[str, list[float]] = {"index": [], "evaluate": []}  # of the model
    cpu: dict[str, list[float]] = {"index": [], "evaluate": []}  # this process and its workers
    loads = [os.getloadavg()[0]]
    loops = [("index", index), ("evaluate", evaluate)]
    for pair in range(repeats):
        for name, loop in loops if pair % 2 == 0 else loops[::-1]:
            with model_clock() as in_model:
                started, cpu_before = time.perf_counter(), cpu_seconds()
                loop()
                times[name].append(time.perf_counter() - started)
                cpu[name].append(cpu_seconds() - cpu_before)
            outside[name].append(times[name][-1] - in_model[0])
        loads.append(os.getloadavg()[0])
        line = ", ".join(
            f"{k} {times[k][-1]:.1f} s ({outside[k][-1]:.2f} s outside the model)" for k in times
        )
        print(f"pair {pair + 1}: {line}; {times['evaluate'][-1] / times['index'][-1]:.2f}x; "
              f"load {loads[-1]:.1f}", flush=True)  # fmt: skip
    ratios = [e / i for i, e in zip(times["index"], times["evaluate"])]
    best = min(times["evaluate"]) / min(times["index"])
    print(
        f"index/evaluate speed per pair: median {np.median(ratios):.2f}x, min {min(ratios):.2f}x, "
        f"max {max(ratios):.2f}x; best run against best run {best:.2f}x; "
        f"load average (1 min) {min(loads):.1f}-{max(loads):.1f}",
        flush=True,
    )
    median = {k: float(np.median(v)) for k, v in times.items()}
    return [
        ["index stage (stages/index/embed.py)", f"{images / median['index']:.0f}",
         f"{np.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x), best {best:.2f}x",
         _seconds(times["index"]), _seconds(outside["index"], 2), _seconds(cpu["index"])],
        ["evaluate stage (stages/evaluate/embed.py)", f"{images / median['evaluate']:.0f}", "1.00x",
         _seconds(times["evaluate"]), _seconds(outside["evaluate"], 2), _seconds(cpu["evaluate"])],
    ]  # fmt: skip


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended (the workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _seconds(values: list[float], digits: int = 1) -> str:
    return f"{np.median(values):.{digits}f} s ({min(values):.{digits}f}-{max(values):.{digits}f})"


@contextmanager
def model_clock():
    """Seconds spent in `ClipModel.encode_images` inside the block (a one-item list)."""
    from captioning.clip_models import ClipModel

    encode, clock = ClipModel.encode_images, [0.0]

    def timed(self, pixels):
        started = time.perf_counter()
        try:
            return encode(self, pixels)
        finally:
            clock[0] += time.perf_counter() - started

    ClipModel.encode_images = timed
    try:
        yield clock
    finally:
        ClipModel.encode_images = encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5, help="embedding loops: pairs of runs, median")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from examples import tiny_models as tm

    torch.set_num_threads(2)
    work = args.work or Path(tempfile.mkdtemp(prefix="search-bench-"))
    config = tm.small_clip_config()
    config["embed_dim"] = args.dim
    arch, checkpoint, configs = tm.save_tiny_clip(
        work / "model", name=f"bench-clip-{args.dim}", config=config
    )
    model = {"arch": arch, "checkpoint": checkpoint, "configs": configs}
    print(f"work folder {work}; {os.cpu_count()} CPUs; device {args.device}", flush=True)
    sizes = [int(r) for r in args.rows.split(",") if r]  # --rows "": the embedding comparison alone
    search = [row for rows in sizes for row in search_rows(work, model, rows, args.dim, args)]
    light = tm.tiny_clip_config()
    light["vision_cfg"]["image_size"] = 64  # the same pixels as the 6-layer one
    arch, checkpoint, configs = tm.save_tiny_clip(work / "light", name="bench-clip-light", config=light)
    models = {
        "6-layer ViT, width 256": model,
        "2-layer ViT, width 64": {"arch": arch, "checkpoint": checkpoint, "configs": configs},
    }
    embedding = [
        [name, *row]
        for name, spec in models.items()
        for row in embedding_rows(work, spec, args.images, args.device, args.repeats)
    ]
    head = ["vectors", "index", "query", "queries/s", "p50 ms", "p99 ms", "recall@10", "build", "parameters"]
    print(
        f"\n{args.dim}-d vectors, {args.queries} queries per row from {args.clients} client threads, k 10\n"
    )
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in search:
        print("| " + " | ".join(row) + " |")
    print(f"\nembedding {args.images} pictures (96 px JPEG, ViTs at 64 px, batch 256, 2 workers)\n")
    print(
        f"| model | loop | images/s (median of {args.repeats}) | vs evaluate: median of pairs (min-max), "
        "best runs | run: median (min-max) | outside the model | CPU s, workers included |"
        "\n|---|---|---:|---:|---:|---:|---:|"
    )
    for row in embedding:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
