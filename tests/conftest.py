"""Shared fixtures: offline environment, the local image server, URL tables, manifests, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
# what a marker of a download made by a test (not by the stage) holds besides its unit and counts
FAKE_MARKER = {"fingerprint": "made-by-test", "settings": {"made_by": "test"}}
os.environ.update(OFFLINE_ENV)

from examples.image_server import ImageServer  # noqa: E402


@pytest.fixture
def image_server():
    """A fresh server per test, so flaky paths fail once in every test that uses them."""
    with ImageServer() as server:
        yield server


def write_url_table(
    path: Path, urls: list[str], captions: list[str] | None = None, labels: list | None = None
) -> Path:
    columns = {"url": urls}
    if captions is not None:
        columns["caption"] = captions
    if labels is not None:
        columns["label"] = labels
    pq.write_table(pa.table(columns), path)
    return path


def write_manifest(folder: Path, download: dict, root: str = "run", name: str = "manifest.yaml") -> Path:
    settings = {
        "url_list": "urls.parquet",
        "samples_per_shard": 5,
        "processes": 1,
        "threads": 4,
        "image_size": 32,
        **download,
    }
    path = folder / name
    path.write_text(yaml.safe_dump({"run": {"root": root, "seed": 0}, "stages": {"download": settings}}))
    return path


def cli_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")
    }
    env["PYTHONPATH"] = str(REPO)
    return {**env, **OFFLINE_ENV, **extra}


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every output file under root with its (mtime_ns, size): equal snapshots mean nothing was
    rewritten. `logs/` is left out: every run appends a line to logs/runs.jsonl."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "logs"
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight models saved once per session and loaded by path like real weights."""
    from examples import tiny_models as tm

    folder = tmp_path_factory.mktemp("tiny-models")
    arch, checkpoint, config_dir = tm.save_tiny_clip(folder / "clip")
    return {
        "clip_arch": arch,
        "clip_checkpoint": checkpoint,
        "clip_configs": config_dir,
        "blip": tm.save_tiny_blip(folder / "blip"),
        "blip2": tm.save_tiny_blip2(folder / "blip2"),
        "llava": tm.save_tiny_llava(folder / "llava"),
    }


def make_image_shards(
    root: Path, shards: int, per_shard: int, corrupt: tuple[int, ...] = ()
) -> list[list[str]]:
    """Image shards as the download stage leaves them (tar, marker, _SUCCESS.json), without a download.

    Row n gets picture n of the image server, caption `alt n` and class n % 3; rows in `corrupt` get
    bytes that are not an image. Returns the keys per shard.
    """
    from examples.image_server import generated_jpeg
    from shards import markers
    from shards.tars import write_tar_atomic

    images = root / "images"
    keys_per_shard = []
    for s in range(shards):
        rows = range(s * per_shard, (s + 1) * per_shard)
        samples = [
            (
                f"{n:09d}",
                {
                    "jpg": b"not a jpeg" if n in corrupt else generated_jpeg(n),
                    "txt": f"alt {n}".encode(),
                    "cls": str(n % 3).encode(),
                },
            )
            for n in rows
        ]
        info = write_tar_atomic(images / f"{s:06d}.tar", samples)
        markers.write_marker(
            images, f"{s:06d}", {**FAKE_MARKER, "unit": f"{s:06d}", "counts": {"ok": per_shard}, **info}
        )
        keys_per_shard.append([k for k, _ in samples])
    markers.write_success(images, {"stage": "download", "fingerprint": "made-by-test"})
    return keys_per_shard


def write_caption_manifest(
    folder: Path, caption: dict, root: str = "run", name: str = "manifest.yaml"
) -> Path:
    settings = {"batch_size": 4, "num_workers": 0, **caption}
    path = folder / name
    path.write_text(yaml.safe_dump({"run": {"root": root, "seed": 0}, "stages": {"caption": settings}}))
    return path
