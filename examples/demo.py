"""The built-in demo: the synthetic instance-retrieval world through the whole pipeline.

    make demo            # or: .venv/bin/python -m examples.demo [--manifest examples/demo.yaml]

Once per run root (kept by later runs): generates the world (examples/world.py) into `<root>/world/`
and pre-trains its tiny CLIP (examples/world_clip.py) into `<root>/models/`. Then serves the world's
files on 127.0.0.1 (the URL table keeps the port it was made with, so a second run resumes instead
of seeing a changed input) while the stages of the manifest run: download -> caption (caption-bank
retrieval) -> finetune (MCIP) -> realign -> evaluate (training under DeepSpeed ZeRO-2, one process on
the CPU) -> index (a baseline and an MCIP index of the evaluation split, packed into tars by
examples/world_shards.py), builds the inspect page of the caption set (`python -m pipeline inspect`),
and prints the comparison table, the report's path, the page's path, per index the results of the
query's own instance in the top 10 of every evaluation picture queried by key (through
stages/index/search.py, as `search --key` and the API answer it), and the `serve` command. A
second run finds every unit done and prints them again.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import yaml

from examples.image_server import ImageServer
from examples.world import WorldSize, generate
from examples.world_shards import eval_shards
from pipeline.cli import main as pipeline_main
from pipeline.manifest import load_manifest
from shards.atomic import write_json_atomic

MANIFEST = Path(__file__).with_name("demo.yaml")
THREADS = 2  # results depend on the thread count (shared/METHOD.md), so the demo pins it
TOP_K = 10  # the own-instance count: results per query


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(root: Path, world_size=None, pretrain_steps: int = 1500, seed: int = 0) -> int:
    """The world and its pre-trained CLIP under `root` (made once); returns the port of its URLs."""
    from examples.world_clip import pretrained_model

    world, done = root / "world", root / "world" / "_world.json"
    size = world_size or WorldSize()
    about = {"seed": seed, "size": vars(size)}
    if done.exists() and json.loads(done.read_text())["about"] == about:
        port = json.loads(done.read_text())["port"]
    else:
        port = free_port()
        generate(world, seed, size, port)
        write_json_atomic(done, {"about": about, "port": port})  # last: the world is complete
    pretrained_model(world, root / "models", steps=pretrain_steps, seed=seed)
    eval_shards(world)  # the evaluation split as tars: what the index stage indexes
    return port


def run_root(manifest_path: Path) -> Path:
    """`run.root` read before validation: the manifest names files that `prepare` has yet to write."""
    root = Path(yaml.safe_load(Path(manifest_path).read_text())["run"]["root"])
    return root if root.is_absolute() else (Path(manifest_path).resolve().parent / root).resolve()


def evaluation_report(manifest_path: Path) -> Path | None:
    manifest = load_manifest(manifest_path)
    if manifest.stages.evaluate is None:
        return None
    folder = Path(manifest.run.root) / "evaluate" / manifest.stages.evaluate.name
    return folder / "report.md" if (folder / "report.md").exists() else None


def inspect_page(manifest_path: Path) -> Path | None:
    """The inspect page of the demo's caption set (stages/inspect.py), rebuilt after every run."""
    from stages.inspect import build_page

    manifest = load_manifest(manifest_path)
    if manifest.stages.caption is None:
        return None
    return build_page(manifest.run.root, manifest.stages.caption.caption_set)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--tiny-world", action="store_true", help="a few hundred pictures (the tests' size)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    root = run_root(args.manifest)
    port = prepare(root, WorldSize.tiny() if args.tiny_world else None, args.pretrain_steps)
    try:
        server = ImageServer(port, folder=root / "world")
    except OSError as err:
        print(
            f"error: cannot serve the demo images on 127.0.0.1:{port} ({err}); "
            f"free the port or delete {root / 'world'} to start over",
            file=sys.stderr,
        )
        return 2
    with server:
        code = pipeline_main(["run", str(args.manifest)])
    if code != 0:
        return code
    page, report = inspect_page(args.manifest), evaluation_report(args.manifest)
    if report is not None:  # the evaluate stage has logged the table above
        print(f"report: {report}")
    if page is not None:
        print(f"inspect page: {page}")
    hits = own_instance_hits(args.manifest)
    if hits is not None:
        queries, counts = hits
        found = ", ".join(f"{name} {count}" for name, count in counts.items())
        print(f"own-instance results in top {TOP_K} over {queries} queries: {found}")
    serve = serve_command(args.manifest)
    if serve is not None:
        print(f"search the evaluation split: {serve}")
    return code


def own_instance_hits(manifest_path: Path, k: int = TOP_K) -> tuple[int, dict[str, int]] | None:
    """(queries, per index: results of the query's own instance in its top k): every picture of the
    index stage's collection queried by its key, itself included, through the search path the
    `search` command and the API use (examples/world_shards.py's keys name the instance)."""
    from examples.world_shards import instance_of
    from stages.index.search import open_indexes

    manifest = load_manifest(manifest_path)
    if manifest.stages.index is None:
        return None
    indexes = open_indexes(manifest, [m.name for m in manifest.stages.index.models])
    keys = next(iter(indexes.values())).meta.column("key").to_pylist()
    counts = {
        name: sum(instance_of(hit.key) == instance_of(key) for key in keys for hit in index.by_key(key, k))
        for name, index in indexes.items()
    }
    return len(keys), counts


def serve_command(manifest_path: Path) -> str | None:
    """The command that serves the demo's indexes side by side (baseline and MCIP)."""
    manifest = load_manifest(manifest_path)
    if manifest.stages.index is None:
        return None
    names = " ".join(f"--index {m.name}" for m in manifest.stages.index.models)
    return f"python -m pipeline serve {manifest_path} {names}"


if __name__ == "__main__":  # img2dataset's worker processes re-import this module
    sys.exit(main())
