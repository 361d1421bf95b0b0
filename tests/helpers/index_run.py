"""A small run with an index stage, for the index, search and serve tests: two image shards whose
alt text includes hostile HTML, a corrupt picture, and two tiny random CLIP models (one from a
checkpoint file, one with other random weights), indexed exactly with `captions: alt, texts: true`."""

from __future__ import annotations

from pathlib import Path

import yaml

from shards import markers
from shards.tars import write_tar_atomic
from tests.conftest import FAKE_MARKER

HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><b>bold</b> & "quotes"'
CORRUPT = "000000004"


def alt_text(n: int) -> str:
    return HOSTILE if n == 1 else f"a {('red', 'blue', 'green')[n % 3]} picture number {n}"


def write_shards(root: Path, shards: int = 2, per_shard: int = 6) -> list[str]:
    """Image shards as the download stage leaves them; returns every key."""
    from examples.image_server import generated_jpeg

    images, keys = Path(root) / "images", []
    for s in range(shards):
        samples = []
        for n in range(s * per_shard, (s + 1) * per_shard):
            key = f"{n:09d}"
            jpg = b"not a jpeg" if key == CORRUPT else generated_jpeg(n)
            url = f"http://127.0.0.1/{key}.jpg".encode()
            samples.append(
                (key, {"jpg": jpg, "txt": alt_text(n).encode(), "json": b'{"url": "' + url + b'"}'})
            )
            keys.append(key)
        info = write_tar_atomic(images / f"{s:06d}.tar", samples)
        marker = {**FAKE_MARKER, "unit": f"{s:06d}", "counts": {"ok": per_shard}, **info}
        markers.write_marker(images, f"{s:06d}", marker)
    markers.write_success(images, {"stage": "download", "fingerprint": "made-by-test"})
    return keys


def write_index_manifest(folder: Path, tiny_models: dict, **index) -> Path:
    settings = {
        "model": tiny_models["clip_arch"],
        "config_dir": str(tiny_models["clip_configs"]),
        "models": [{"name": "base", "checkpoint": str(tiny_models["clip_checkpoint"])}, {"name": "other"}],
        "captions": "alt",
        "texts": True,
        "batch_size": 4,
        "num_workers": 0,
        **index,
    }
    path = Path(folder) / "manifest.yaml"
    path.write_text(yaml.safe_dump({"run": {"root": "run", "seed": 0}, "stages": {"index": settings}}))
    return path
