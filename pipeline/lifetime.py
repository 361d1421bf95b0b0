"""A worker started by torchrun dies with it.

torchrun (torch's elastic agent, also behind `accelerate launch`) starts each worker in a session of
its own, so a SIGKILL to the agent's process group (a killed job step, `kill -9 -PGID`) leaves the
workers running: a restarted job can then meet a live orphan that still writes the same checkpoints.
`die_with_launcher()`, called first thing by the CLI, asks Linux to SIGKILL this process when its
parent dies (prctl PR_SET_PDEATHSIG), but only when that parent is torchrun's agent: a CLI started from
a shell or by srun keeps its usual lifetime.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHER_MODULES = frozenset({"torch.distributed.run", "torch.distributed.launch"})
LAUNCHER_PROGRAMS = frozenset({"torchrun", "accelerate"})


def is_launcher(argv: list[str]) -> bool:
    """Whether a command line is torchrun's agent: `torchrun ...`, `python -m torch.distributed.run
    ...` (or `.launch`), or `accelerate launch ...`, which runs the same agent in its own process."""
    return any(arg in LAUNCHER_MODULES or Path(arg).name in LAUNCHER_PROGRAMS for arg in argv[:3])


def _command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def die_with_launcher(env: Mapping[str, str] = os.environ) -> bool:
    """Under torchrun, have this process killed when the agent dies; return whether it was set up.
    If the agent is already gone by the time the request is in place, exit at once."""
    if not sys.platform.startswith("linux") or not ("TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env):
        return False
    parent = os.getppid()
    if not is_launcher(_command_line(parent)):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("could not ask to die with torchrun (prctl: %s)", os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != parent:  # the agent died before the request was in place: nobody will kill us
        os.kill(os.getpid(), signal.SIGKILL)
    return True
