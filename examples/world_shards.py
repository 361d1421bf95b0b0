"""The world's evaluation split as webdataset tars, for the index stage of the demo.

    python -m examples.world_shards WORLD      # writes WORLD/eval_shards/000000.tar, ...

Reads `WORLD/eval/<instance>/<n>.jpg` and `WORLD/eval/captions.json`; writes one sample per picture
(key `<instance>_<n>`, `.jpg`, `.txt` its caption, `.json` its file name as `url`), 256 per tar, in
sorted order with fixed member times (tars are byte-identical for the same world), then
`_made.json` last: a second call with the same world writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shards.atomic import write_json_atomic
from shards.tars import write_tar_atomic

PER_TAR = 256


def instance_of(key: str) -> str:
    """The instance (class) of a key of these tars: what the index's results are judged by."""
    return key.rsplit("_", 1)[0]


def eval_shards(world: Path) -> Path:
    """`world/eval_shards/` (made once per world); returns the folder."""
    world, out = Path(world), Path(world) / "eval_shards"
    if (out / "_made.json").exists():
        return out
    entries = json.loads((world / "eval" / "captions.json").read_text())["images"]
    samples = []
    for entry in sorted(entries, key=lambda e: (e["filepath"], int(Path(e["filename"]).stem))):
        name = f"{entry['filepath']}/{entry['filename']}"
        fields = {
            "jpg": (world / "eval" / name).read_bytes(),
            "txt": entry["sentences"][0]["raw"].encode(),
            "json": json.dumps({"url": f"eval/{name}"}).encode(),
        }
        samples.append((f"{entry['filepath']}_{Path(entry['filename']).stem}", fields))
    for start in range(0, len(samples), PER_TAR):
        write_tar_atomic(out / f"{start // PER_TAR:06d}.tar", samples[start : start + PER_TAR])
    write_json_atomic(out / "_made.json", {"samples": len(samples), "per_tar": PER_TAR})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world", type=Path)
    print(eval_shards(parser.parse_args().world))


if __name__ == "__main__":
    main()
