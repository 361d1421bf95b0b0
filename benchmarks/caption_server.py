"""Benchmark of the `server` caption backend (run through benchmarks/caption.py --server).

    .venv/bin/python benchmarks/caption.py --server [--latency 0.04 --capacity 8 --images 960]
    .venv/bin/python benchmarks/caption.py --server --device cuda --server-model M --vllm-venv DIR

Table 1, keeping the engine full: the engine simulator (tests/helpers/engine_simulator.py, a real HTTP
server on 127.0.0.1 in a process of its own: latency L, capacity C requests in service at once, 5 %
stragglers at 5x L, seeded) behind
  bare   a plain pipelined client: W requests in flight over the same request bodies, nothing else;
  old    the caption stage with the per-batch schedule (`caption` per loader batch of 32, waiting for
         the batch's slowest request: the first client);
  new    the caption stage with the streaming client (a window across batches and shards);
for windows W (max_concurrency) of 1x, 2x and 4x C, and the new client against 2 simulators.
From the simulator's own log: requests/s over the engine's span (first request in, last answer out:
the stage's start-up is not counted), and "busy": the fraction of the engine's capacity in service
while the client still had requests to send (`busy_fraction`: the drain after the last request,
which no client can fill, and the straggler draw's luck left out), i.e. the achieved share of the
capacity C / mean service time. Each variant runs `--repeats` times (default 2, interleaved), the
best run is shown: this shared 2-core machine's load moves single runs by up to 0.2. Target: busy
new >= 0.95 and new/bare (busy) >= 0.97.
With --device cuda the table runs against the vLLM started from --vllm-venv (no simulator, no
capacity: ratios against the bare client only).

Table 2, the server path against the in-process `vlm` backend on the same tiny model, same images
and k (greedy, one caption per prompt): captions/s of the caption stage; the server started once
beforehand (its start-up reported apart). CPU: tiny LLaVA-1.5 behind `transformers serve`; cuda: the
named model behind vLLM, one GPU, the in-process backend in bfloat16 on the same GPU.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from captioning.base import GenerationOptions
from captioning.server import ServerCaptioner
from stages import caption
from stages.base import RunContext

SAMPLE = {"decoding": "sample", "max_new_tokens": 12, "min_new_tokens": 0}
K = 3  # one request per image (n = k)
SERVER_PROMPTS = ["Describe the image in one sentence.", "What is in the picture?", "Caption this photo."]


@contextlib.contextmanager
def simulator(latency: float, capacity: int, seed: int):
    """The engine simulator in a process of its own (its threads do not share our interpreter)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.engine_simulator", "--latency", str(latency)]
        + ["--capacity", str(capacity), "--seed", str(seed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        yield f"http://127.0.0.1:{int(process.stdout.readline())}"
    finally:
        process.stdin.close()
        process.wait(10)


def engine_log(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/stats", timeout=30) as answer:
        return json.loads(answer.read())["log"]


def busy_rate(logs: list[list[dict]]) -> float:
    """Requests per second over each engine's span from its first arrival to its last answer, summed."""
    return sum(len(log) / (max(e["ended"] for e in log) - min(e["arrived"] for e in log)) for log in logs)


def busy_fraction(logs: list[list[dict]], capacity: int) -> float:
    """How full the engines were kept while the client still had work to send: the time their slots
    were in service between the first request's arrival and the last one's, over capacity x that span
    (mean over engines). The drain after the last arrival, which no client can fill, is left out, and
    so is the luck of the straggler draw (actual service times, not their mean)."""
    fractions = []
    for log in logs:
        first, last = min(e["arrived"] for e in log), max(e["arrived"] for e in log)
        busy = sum(max(0.0, min(e["ended"], last) - max(e["started"], first)) for e in log)
        fractions.append(busy / (capacity * (last - first)))
    return sum(fractions) / len(fractions)


def _bodies(jpegs: list[bytes], model: str) -> list[dict]:
    return [
        {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(j).decode()},
                        },
                        {"type": "text", "text": "Describe the image in one sentence."},
                    ],
                }
            ],
            "max_tokens": SAMPLE["max_new_tokens"],
            "temperature": 1.0,
            "top_p": 0.9,
            "seed": i,
            "n": K,
        }
        for i, j in enumerate(jpegs)
    ]


async def _bare(url: str, bodies: list[dict], window: int) -> None:
    import httpx

    limits = httpx.Limits(max_connections=window, max_keepalive_connections=window)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        queue = list(reversed(bodies))

        async def worker() -> None:
            while queue:
                (await client.post(url + "/v1/chat/completions", json=queue.pop())).raise_for_status()

        await asyncio.gather(*(worker() for _ in range(window)))


def _stage(root: Path, urls: list[str], model: str, window: int, streams: bool, workers: int) -> None:
    server = {"endpoints": urls, "max_concurrency": window}
    cfg = caption.CaptionConfig(
        backend="server",
        model=model,
        captions_per_image=K,
        generation=SAMPLE,
        server=server,
        batch_size=32,
        num_workers=workers,
        filter={"min_words": 0, "dedupe": False},
    )
    old = ServerCaptioner.streams
    ServerCaptioner.streams = streams
    try:
        assert caption.run(cfg, RunContext(root=root)).is_complete
    finally:
        ServerCaptioner.streams = old


@contextlib.contextmanager
def vllm(args, work: Path):
    """cuda: one vLLM per engine (one GPU each) from --vllm-venv, started as the stage would."""
    from stages.caption.server_process import started
    from stages.layout import RunLayout

    venv = args.vllm_venv or os.environ.get("VLLM_VENV")
    if not args.server_model or not venv:
        raise SystemExit("--device cuda needs --server-model and --vllm-venv (or $VLLM_VENV)")
    serve = f"CUDA_VISIBLE_DEVICES={{gpu}} {Path(venv) / 'bin' / 'vllm'} serve {{model}} --port {{port}}"
    cfg = caption.CaptionConfig(
        backend="server", model=args.server_model, server={"serve": serve, "startup_timeout_s": 1800}
    )
    with started(cfg, RunContext(root=work), RunLayout(work), "0") as url:
        yield url


def table_one(args) -> None:
    from benchmarks.caption import make_shards, photo_jpeg

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    cuda = args.device == "cuda"
    rows = [(m, 1) for m in (1, 2, 4)] + ([] if cuda else [(2, 2)])
    # 2 engines get twice the images: the same work per engine as one engine gets
    jpegs = [photo_jpeg(n, 256 if cuda else 64) for n in range(args.images * max(e for _, e in rows))]
    model = args.server_model if cuda else "sim"
    mean_service = args.latency * (0.95 + 0.05 * 5)
    capacity = args.capacity / mean_service
    engine = (
        f"vLLM {model}"
        if cuda
        else (
            f"simulator L={args.latency * 1000:g} ms, C={args.capacity}, 5% stragglers at 5x "
            f"(mean service {mean_service * 1000:.1f} ms): capacity {capacity:.1f} requests/s per engine"
        )
    )
    print(
        f"\nserver client vs engine: {args.images} images per engine, {engine}; batch 32, k={K} per request"
    )
    print(
        f"{'window':>7}{'engines':>8}{'bare r/s':>10}{'old r/s':>9}{'new r/s':>9}"
        f"{'busy bare':>11}{'busy old':>10}{'busy new':>10}{'new/bare':>10}"
    )
    for multiple, engines in rows:
        images = jpegs[: args.images * engines]
        bodies = _bodies(images, model)
        window = multiple * args.capacity
        rates, busy = {}, {}
        with contextlib.ExitStack() as stack:
            if cuda:
                urls = [stack.enter_context(vllm(args, work / f"vllm-{multiple}"))]
            else:
                urls = [
                    stack.enter_context(simulator(args.latency, args.capacity, s)) for s in range(engines)
                ]
            variants = ("bare", "old", "new") if engines == 1 else ("bare", "new")
            for rep, variant in [(r, v) for r in range(args.repeats) for v in variants]:
                start = time.perf_counter()
                seen = [len(engine_log(u)) for u in urls] if not cuda else None
                if variant == "bare":
                    asyncio.run(_gather_bare(urls, [bodies[i::engines] for i in range(engines)], window))
                else:
                    root = work / f"{variant}-{multiple}-{engines}-{rep}"
                    make_shards(root, len(images), jpegs=images)
                    _stage(root, urls, model, window, variant == "new", args.workers)
                if cuda:  # no engine log: wall time (the stage's start-up included)
                    rate = len(images) / (time.perf_counter() - start)
                    rates[variant] = max(rates.get(variant, 0.0), rate)
                    continue
                logs = [engine_log(u)[n:] for u, n in zip(urls, seen)]
                if busy_fraction(logs, args.capacity) > busy.get(variant, -1.0):  # the best of the repeats
                    rates[variant], busy[variant] = busy_rate(logs), busy_fraction(logs, args.capacity)
        _print_row(f"{multiple}x C" if not cuda else str(window), engines, rates, busy)


def _print_row(window: str, engines: int, rates: dict[str, float], busy: dict[str, float]) -> None:
    def cell(value: float | None, width: int, digits: int) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    ratio = busy["new"] / busy["bare"] if busy else rates["new"] / rates["bare"]
    print(
        f"{window:>7}{engines:>8}{cell(rates['bare'], 10, 1)}{cell(rates.get('old'), 9, 1)}"
        f"{cell(rates['new'], 9, 1)}{cell(busy.get('bare'), 11, 2)}{cell(busy.get('old'), 10, 2)}"
        f"{cell(busy.get('new'), 10, 2)}{cell(ratio, 10, 2)}"
    )


async def _gather_bare(urls: list[str], shares: list[list[dict]], window: int) -> None:
    await asyncio.gather(*(_bare(u, s, window) for u, s in zip(urls, shares)))


def _caption_seconds(cfg, root: Path) -> float:
    start = time.perf_counter()
    assert caption.run(cfg, RunContext(root=root)).is_complete
    return time.perf_counter() - start


def table_two(images: int, workers: int, device: str, model: str | None, vllm_venv: str | None) -> None:
    from benchmarks.caption import BATCH, make_shards
    from examples import tiny_models
    from stages.caption.server_process import started
    from stages.layout import RunLayout

    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    if device == "cpu":
        model = str(model or tiny_models.save_tiny_llava(work / "llava"))
        serve = (
            f"{Path(sys.executable).parent / 'transformers'} serve {{model}} --host 127.0.0.1 --port {{port}}"
        )
        serve += " --device cpu --dtype float32"
        dtype, max_tokens, batch = "float32", 12, BATCH
    else:
        venv = vllm_venv or os.environ.get("VLLM_VENV")
        if not model or not venv:
            raise SystemExit("--device cuda needs --server-model and --vllm-venv (or $VLLM_VENV)")
        serve = f"CUDA_VISIBLE_DEVICES={{gpu}} {Path(venv) / 'bin' / 'vllm'} serve {{model}} --port {{port}}"
        dtype, max_tokens, batch = "bfloat16", 30, 256
    generation = GenerationOptions(
        decoding="prompts", prompts=SERVER_PROMPTS, max_new_tokens=max_tokens, min_new_tokens=0
    )
    common = dict(
        model=model,
        generation=generation,
        batch_size=batch,
        num_workers=workers,
        filter={"min_words": 0, "dedupe": False},
    )
    for name in ("inproc", "served"):
        make_shards(work / name, images)
    inproc = caption.CaptionConfig(backend="vlm", dtype=dtype, device=device, **common)
    rows = [("in-process `vlm` backend", _caption_seconds(inproc, work / "inproc"))]
    launcher = caption.CaptionConfig(
        backend="server", server={"serve": serve, "startup_timeout_s": 1800}, **common
    )
    begin = time.perf_counter()
    with started(launcher, RunContext(root=work / "served"), RunLayout(work / "served")) as endpoint:
        startup = time.perf_counter() - begin
        served = caption.CaptionConfig(
            backend="server", server={"endpoint": endpoint, "max_concurrency": 64}, **common
        )
        engine = "transformers serve" if device == "cpu" else "vLLM"
        rows.append((f"`server` backend ({engine})", _caption_seconds(served, work / "served")))
    captions = images * len(SERVER_PROMPTS)
    print(f"\nserver vs in-process: {images} images, {model}, {device}, k={len(SERVER_PROMPTS)} greedy")
    print(f"{'variant':<40}{'seconds':>9}{'captions/s':>12}")
    for name, seconds in rows:
        print(f"{name:<40}{seconds:>9.2f}{captions / seconds:>12.1f}")
    print(
        f"server start-up (not counted): {startup:.1f} s; server/in-process = {rows[0][1] / rows[1][1]:.2f}"
    )
