"""A rank embedding a caption bank, as its own process (for the bank tests).

    python -m tests.helpers.bank_embed CACHE BANK RANK WORLD CHUNK_ROWS ARCH CHECKPOINT CONFIGS [WAIT]

Prints one JSON line: the chunks this process embedded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from captioning.clip_models import load_clip
from stages.caption import RetrievalSection
from stages.caption.bank import prepare_bank


def main(argv: list[str]) -> None:
    cache, bank, rank, world, chunk_rows, arch, checkpoint, configs = argv[:8]
    wait = int(argv[8]) if len(argv) > 8 else 60
    section = RetrievalSection(bank=Path(bank), bank_batch_size=8, bank_wait_seconds=wait)
    clip = load_clip(arch, checkpoint, Path(configs))
    result = prepare_bank(section, clip, Path(cache), int(rank), int(world), False, int(chunk_rows))
    print(json.dumps({"embedded": result.embedded, "rows": len(result)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
