"""`search` and `serve`: the index stage's indexes from the command line and over HTTP.

    python -m pipeline search MANIFEST --index NAME (--text "..." | --image FILE | --key KEY) [-k 20] [--json]
    python -m pipeline serve MANIFEST --index baseline --index mcip [--host 127.0.0.1] [--port 8000]

`search` prints one line per result (rank, score, key, url, caption) or, with --json, a list of
{key, score, url, caption, alt}. `serve` runs stages/index/serve.py until Ctrl-C.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from stages.errors import StageConfigError

MAX_K = 1000
MAX_IMAGE_BYTES = 64 << 20


def add_parsers(sub) -> None:
    search = sub.add_parser("search", help="query an index built by the index stage")
    search.add_argument("manifest")
    search.add_argument("--index", required=True, metavar="NAME", help="a model name of stages.index")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text -> image")
    query.add_argument("--image", type=Path, metavar="FILE", help="picture -> image")
    query.add_argument("--key", help="a picture of the collection by its key")
    search.add_argument("-k", type=int, default=20, help="results (default 20)")
    search.add_argument("--json", action="store_true", help="machine-readable output")
    serve = sub.add_parser("serve", help="a search page and JSON API over one or two indexes")
    serve.add_argument("manifest")
    serve.add_argument(
        "--index", required=True, action="append", metavar="NAME", help="repeat for side by side"
    )
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free one")
    serve.add_argument("--max-k", type=int, default=100, help="largest k a query may ask for")
    serve.add_argument("--max-upload-mib", type=float, default=8.0, help="largest upload in MiB")
    serve.add_argument("--max-pixels", type=float, default=4.0e7, help="largest upload by its header")


def search(args, manifest, ctx) -> int:
    from stages.index.search import QueryError, open_indexes

    if not 1 <= args.k <= MAX_K:
        raise StageConfigError(f"-k must be between 1 and {MAX_K}, got {args.k}")
    index = open_indexes(manifest, [args.index])[args.index]
    try:
        if args.text is not None:
            hits = index.by_text(args.text, args.k)
        elif args.key is not None:
            hits = index.by_key(args.key, args.k)
        else:
            hits = index.by_image(_read_picture(args.image), args.k, max_pixels=4.0e7)
    except QueryError as err:
        raise StageConfigError(str(err)) from None
    if args.json:
        print(json.dumps([hit.to_dict() for hit in hits], indent=1))
        return 0
    for rank, hit in enumerate(hits, 1):
        caption = " ".join((hit.caption or hit.alt or "").split())
        print(f"{rank:3d}  {hit.score:.4f}  {hit.key}  {hit.url or '-'}  {caption!r}")
    return 0


def _read_picture(path: Path) -> bytes:
    if not path.is_file():
        raise StageConfigError(f"--image: file not found: {path}")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise StageConfigError(f"--image: {path} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    return path.read_bytes()


def serve(args, manifest, ctx) -> int:
    from stages.index.search import open_indexes
    from stages.index.serve import make_app, running

    if args.max_k < 1:
        raise StageConfigError(f"--max-k must be >= 1, got {args.max_k}")
    indexes = open_indexes(manifest, list(dict.fromkeys(args.index)))
    app = make_app(indexes, args.max_k, int(args.max_upload_mib * 2**20), args.max_pixels)
    with running(app, args.host, args.port) as url:
        print(f"serving {', '.join(indexes)} on {url}/ (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopped")
    return 0
