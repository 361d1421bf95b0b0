"""The built-in demo: generated images served on 127.0.0.1, then the pipeline on examples/demo.yaml.

    make demo            # or: .venv/bin/python -m examples.demo

Writes once: runs/demo/urls.parquet (its URLs keep the port they were made with, so a second run
resumes instead of seeing a changed input), a caption bank (many phrasings per meaning) and a tiny
open_clip model. Serves the images while the stages run (download -> caption with the paper's
caption-bank retrieval) and prints the status. A second run finds every unit done.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from examples.image_server import ImageServer
from pipeline.cli import main as pipeline_main

MANIFEST = Path(__file__).with_name("demo.yaml")
DEMO = Path(__file__).resolve().parents[1] / "runs" / "demo"
URLS = DEMO / "urls.parquet"
BANK = DEMO / "caption_bank.txt"
MODELS = DEMO / "models"
TEMPLATES = ["a {c} {s} on {b}", "a photo of a {c} {s} on a {b} background", "{c} {s}, {b} background",
             "an image showing a {c} {s} in front of {b}", "a picture of a {c} {s}", "a {s} coloured {c} on {b}"]
NUM_IMAGES = 300
SHAPES = ["square", "circle"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "cyan"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_url_table(port: int) -> None:
    """Picture n: background colour n % 6, shape n % 2 (see examples/image_server.py)."""
    urls = [f"http://127.0.0.1:{port}/img/{n}.jpg" for n in range(NUM_IMAGES)]
    captions = [f"a {COLOURS[(n // 6 + 1) % 6]} {SHAPES[n % 2]} on {COLOURS[n % 6]}" for n in range(NUM_IMAGES)]
    labels = [f"{SHAPES[n % 2]}-{COLOURS[n % 6]}" for n in range(NUM_IMAGES)]
    URLS.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": urls, "caption": captions, "label": labels}), URLS)


def write_caption_bank() -> None:
    """Every (colour, shape, background) meaning in several phrasings; written once."""
    if BANK.exists():
        return
    lines = [t.format(c=c, s=s, b=b) for c in COLOURS for s in SHAPES for b in COLOURS if c != b for t in TEMPLATES]
    BANK.parent.mkdir(parents=True, exist_ok=True)
    BANK.write_text("\n".join(lines) + "\n")


def write_clip_model() -> None:
    from examples.tiny_models import TINY_CLIP, save_tiny_clip

    if not (MODELS / f"{TINY_CLIP}.pt").exists():
        save_tiny_clip(MODELS)


def demo_port() -> int:
    if URLS.exists():
        return urlparse(pq.read_table(URLS, columns=["url"])["url"][0].as_py()).port
    port = free_port()
    write_url_table(port)
    return port


def main() -> int:
    port = demo_port()
    write_caption_bank()
    write_clip_model()
    try:
        server = ImageServer(port)
    except OSError as err:
        print(f"error: cannot serve the demo images on 127.0.0.1:{port} ({err}); "
              f"free the port or delete {URLS.parent} to start over", file=sys.stderr)
        return 2
    with server:
        code = pipeline_main(["run", str(MANIFEST)])
    return code or pipeline_main(["status", str(MANIFEST)])


if __name__ == "__main__":  # img2dataset's worker processes re-import this module
    sys.exit(main())
