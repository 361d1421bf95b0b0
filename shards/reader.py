"""Reading samples of finished shards through webdataset.

for sample in iter_samples(["runs/demo/images/000000.tar"]):
    sample["__key__"], sample["jpg"], sample.get("cls")
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import webdataset as wds


def iter_samples(tar_paths: list[Path], handler=wds.reraise_exception) -> Iterator[dict]:
    """Raw samples (`__key__`, and bytes per extension) of the tars, in order.

    No node or worker splitting here: callers hand each rank and DataLoader worker its own shards.
    """
    urls = [str(p) for p in tar_paths]
    if not urls:
        return iter(())
    return iter(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=handler)))
