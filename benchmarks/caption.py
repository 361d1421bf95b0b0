"""Benchmark: caption throughput and retrieval scaling, each variant measured in this one run.

    .venv/bin/python benchmarks/caption.py [--images 384] [--bank-sizes 250000,500000,1000000]
    .venv/bin/python benchmarks/caption.py --server [--device cuda --server-model M --vllm-venv DIR]

Part 1, the same images and the same BLIP (random weights, beam search, 3 captions per image), once
with the tests' tiny BLIP and once with a compute-heavier small one:
  (a) naive: decode each JPEG to PIL and call `generate` one image at a time;
  (b) bound: the model alone on pre-decoded, pre-processed batched tensors;
  (c) ours:  the caption stage end to end (image shards -> DataLoader workers -> parquet + markers).
Targets: (c) >= 3x (a) and (c) >= 0.8x (b).

Part 3 (--server; benchmarks/caption_server.py): the streaming client against the engine simulator's
capacity (old per-batch client, new client, a bare pipelined client; windows 1x/2x/4x C; 2 engines),
then the `server` backend against the in-process `vlm` backend, same model, images and k (greedy):
  --device cpu   tiny LLaVA-1.5 behind `transformers serve` (needs transformers[serving]).
  --device cuda  a named model (--server-model) behind vLLM from its own environment (--vllm-venv or
                 $VLLM_VENV: the folder holding bin/vllm), one GPU: both tables against it.

Part 2, the retrieval backend's search: 10k image embeddings against banks of growing size
(random unit vectors of the tiny CLIP's width and of ViT-B's 512), exact faiss inner product plus
the top-k/threshold step. Target: < 60 s for 1M captions, linear in bank size.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from captioning.base import GenerationOptions, get_captioner  # noqa: E402
from captioning.knn import build_index, search, top_k_above  # noqa: E402
from examples import tiny_models  # noqa: E402
from shards import markers  # noqa: E402
from shards.tars import write_tar_atomic  # noqa: E402
from stages import caption  # noqa: E402
from stages.base import RunContext  # noqa: E402

BATCH = 32
K = 3
GENERATION = GenerationOptions(decoding="beam", max_new_tokens=12, min_new_tokens=4)


def photo_jpeg(n: int, size: int = 256) -> bytes:
    """A noisy 256 px picture: decoding it costs about what a downloaded image does."""
    rng = np.random.default_rng(n)
    pixels = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def make_shards(
    root: Path, images: int, per_shard: int = 64, jpegs: list[bytes] | None = None
) -> list[bytes]:
    jpegs = jpegs or [photo_jpeg(n) for n in range(images)]
    for s in range(0, images, per_shard):
        unit = f"{s // per_shard:06d}"
        write_tar_atomic(
            root / "images" / f"{unit}.tar",
            [(f"{n:09d}", {"jpg": jpegs[n]}) for n in range(s, min(s + per_shard, images))],
        )
        markers.write_marker(root / "images", unit, {"unit": unit, "fingerprint": "bench", "settings": {}})
    markers.write_success(root / "images", {"fingerprint": "bench"})
    return jpegs


def naive(model_dir: Path, jpegs: list[bytes]) -> float:
    captioner = get_captioner("blip", model=str(model_dir), k=K, generation=GENERATION)
    transform = captioner.image_transform()
    start = time.perf_counter()
    for jpeg in jpegs:
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        captioner.caption(transform([image]), [""])  # the processor runs per batch (here of one)
    return time.perf_counter() - start


def bound(model_dir: Path, jpegs: list[bytes]) -> float:
    captioner = get_captioner("blip", model=str(model_dir), k=K, generation=GENERATION)
    transform = captioner.image_transform()
    images = [Image.open(io.BytesIO(j)).convert("RGB") for j in jpegs]
    batches = [transform(images[i : i + BATCH]) for i in range(0, len(images), BATCH)]
    start = time.perf_counter()
    for i, inputs in zip(range(0, len(images), BATCH), batches):
        captioner.caption(inputs, [""] * len(images[i : i + BATCH]))
    return time.perf_counter() - start


def ours(model_dir: Path, root: Path, workers: int) -> float:
    cfg = caption.CaptionConfig(
        backend="blip",
        model=str(model_dir),
        captions_per_image=K,
        generation=GENERATION,
        batch_size=BATCH,
        num_workers=workers,
        filter={"min_words": 0, "dedupe": False},
    )
    start = time.perf_counter()
    result = caption.run(cfg, RunContext(root=root))
    assert result.is_complete
    return time.perf_counter() - start


MODELS = {"tiny": {}, "small": {"width": 192, "layers": 4, "image_size": 128, "patch_size": 16}}


def part_one(images: int, workers: int, size: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    model_dir = tiny_models.save_tiny_blip(work / "blip", **MODELS[size])
    jpegs = make_shards(work / "run", images)
    rows = [
        ("(a) naive, one image at a time", naive(model_dir, jpegs)),
        ("(b) model on pre-decoded batches", bound(model_dir, jpegs)),
        (f"(c) caption stage, {workers} workers", ours(model_dir, work / "run", workers)),
    ]
    rates = {name: images / seconds for name, seconds in rows}
    print(
        f"\ncaption throughput: {images} images (256 px JPEG), {size} BLIP {MODELS[size]}, beam 3, "
        f"batch {BATCH}, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(f"{'variant':<40}{'seconds':>9}{'images/s':>10}")
    for name, seconds in rows:
        print(f"{name:<40}{seconds:>9.2f}{rates[name]:>10.1f}")
    a, b, c = rates.values()
    print(f"(c)/(a) = {c / a:.2f}  (target >= 3)    (c)/(b) = {c / b:.2f}  (target >= 0.8)")


def part_two(
    bank_sizes: list[int], queries: int, dims: list[int], k: int = 20, threshold: float = 0.271
) -> None:
    print(f"\nretrieval search: {queries} images, top-{k} above {threshold}, exact faiss inner product")
    print(f"{'dim':>5}{'bank':>10}{'index s':>9}{'search s':>10}{'images/s':>10}{'s per 1M':>10}")
    rng = np.random.default_rng(0)
    for dim in dims:
        image_embeddings = _unit(rng, queries, dim)
        for size in bank_sizes:
            bank = _unit(rng, size, dim)
            start = time.perf_counter()
            index = build_index(bank, "flat")
            built = time.perf_counter()
            top_k_above(*search(index, image_embeddings, k), threshold)
            searched = time.perf_counter() - built
            print(
                f"{dim:>5}{size:>10}{built - start:>9.2f}{searched:>10.2f}{queries / searched:>10.0f}"
                f"{searched * 1e6 / size:>10.2f}"
            )
            del bank, index


def _unit(rng, rows: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--server-images", type=int, default=64, help="part 3, table 2 (transformers serve)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="tiny,small", help="BLIP sizes: tiny (the tests' model), small")
    parser.add_argument("--bank-sizes", default="250000,500000,1000000")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dims", default="32,512")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--server", action="store_true", help="part 3 only: the server backend")
    parser.add_argument(
        "--latency", type=float, default=0.05, help="part 3: the simulator's service time (s)"
    )
    parser.add_argument("--capacity", type=int, default=8, help="part 3: requests the engine serves at once")
    parser.add_argument("--repeats", type=int, default=2, help="part 3: runs per variant (best shown)")
    parser.add_argument("--simulator-only", action="store_true", help="part 3: table 1 only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--server-model", help="part 3: hub name or folder (cpu: default the tiny LLaVA)")
    parser.add_argument("--vllm-venv", help="part 3, cuda: the virtual environment holding bin/vllm")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.server:
        from benchmarks import caption_server

        caption_server.table_one(args)
        if not args.simulator_only:
            caption_server.table_two(
                args.server_images, args.workers, args.device, args.server_model, args.vllm_venv
            )
        return
    for size in args.models.split(","):
        part_one(args.images, args.workers, size)
    if not args.skip_retrieval:
        part_two(
            [int(s) for s in args.bank_sizes.split(",")], args.queries, [int(d) for d in args.dims.split(",")]
        )


if __name__ == "__main__":
    main()
