"""Logging set up once by the CLI, with a rank prefix: `12:00:01 [download 3/8] INFO ...`.

Without `-v`: our own loggers (pipeline, stages, captioning, shards, examples) at INFO, everyone
else at WARNING (open_clip logs its model-creation INFO lines on the root logger, so the filter goes
by logger name, not only by level). With `-v`: everything at DEBUG, as before.
"""

from __future__ import annotations

import logging
import os
import sys

OURS = frozenset({"pipeline", "stages", "captioning", "shards", "examples", "__main__"})
# third-party loggers that have their own level or handler; set to WARNING unless -v
THIRD_PARTY = ("open_clip", "transformers", "DeepSpeed", "deepspeed", "accelerate", "img2dataset")
THIRD_PARTY += ("torch.distributed", "faiss", "matplotlib", "PIL", "urllib3", "fsspec")


class _Prefix(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.stage, self.rank, self.world = "-", 0, 1

    def filter(self, record: logging.LogRecord) -> bool:
        record.prefix = f"{self.stage} {self.rank}/{self.world}"
        return True


class _OursOrWarnings(logging.Filter):
    """INFO only from our own packages; WARNING and above from anyone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OURS


_prefix = _Prefix()


def setup_logging(rank: int, world: int, verbose: bool = False) -> None:
    _prefix.rank, _prefix.world = rank, world
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_prefix)
    if not verbose:
        handler.addFilter(_OursOrWarnings())
    handler.setFormatter(logging.Formatter("%(asctime)s [%(prefix)s] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in OURS:  # a level of their own: DeepSpeed's set-up raises the root logger's to WARNING
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_third_party(verbose)


def quiet_third_party(verbose: bool = False) -> None:
    """Third-party loggers at WARNING, also in the worker processes they start (through the environment
    variables the libraries read); with -v they are left as the libraries set them."""
    if verbose:
        return
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    os.environ.setdefault("ACCELERATE_LOG_LEVEL", "warning")


def set_stage(name: str) -> None:
    _prefix.stage = name
