"""Logging set up once by the CLI, with a rank prefix: `12:00:01 [download 3/8] INFO ...`."""

from __future__ import annotations

import logging
import sys


class _Prefix(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.stage, self.rank, self.world = "-", 0, 1

    def filter(self, record: logging.LogRecord) -> bool:
        record.prefix = f"{self.stage} {self.rank}/{self.world}"
        return True


_prefix = _Prefix()


def setup_logging(rank: int, world: int, verbose: bool = False) -> None:
    _prefix.rank, _prefix.world = rank, world
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_prefix)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(prefix)s] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def set_stage(name: str) -> None:
    _prefix.stage = name
