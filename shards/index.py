"""The shard index in the wids `wids-shard-index-v1` format (`images/_index.json`).

`wids.ShardListDataset("images/_index.json")` opens the shards for random access.
"""

from __future__ import annotations

from pathlib import Path

from shards.atomic import write_json_atomic


def write_shard_index(path: Path, shards: list[dict], name: str = "images") -> None:
    """`shards`: dicts with `url` (relative to the index file), `nsamples`, `filesize`."""
    entries = sorted(shards, key=lambda s: s["url"])
    write_json_atomic(
        path, {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name, "shardlist": entries}
    )
