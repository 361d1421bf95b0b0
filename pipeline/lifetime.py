"""A worker started by torchrun dies with it.

torchrun (torch's elastic agent, also behind `accelerate launch`) starts each worker in a session of
its own, so a SIGKILL to the agent's process group (a killed job step, `kill -9 -PGID`) leaves the
workers running: a restarted job can then meet a live orphan that still writes the same checkpoints.
`die_with_launcher()`, called first thing by the CLI, asks Linux to SIGKILL this process when its
parent dies (prctl PR_SET_PDEATHSIG), but only when that parent is torchrun's agent: a CLI started from
a shell or by srun keeps its usual lifetime.

The request is armed before the parent is looked at: an agent killed while its worker was still
starting (importing torch takes seconds) has already handed the worker to init or a subreaper, and
a request armed then would watch the wrong parent. So a worker that torchrun started
(`TORCHELASTIC_RUN_ID`, which torchrun's agent sets for its workers only) but that no longer has the
agent among its nearest ancestors exits at once with one line saying why.
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
ANCESTORS_SEARCHED = 3  # the agent, or a wrapper it ran (`torchrun --no-python bash -c ...`) and its agent
ORPHANED_EXIT_CODE = 1


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


def _parent_of(pid: int) -> int:
    """The parent pid from /proc/<pid>/stat (0 when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and brackets


def _launcher_among_ancestors(pid: int) -> bool:
    for _ in range(ANCESTORS_SEARCHED):
        if pid <= 1:
            return False
        if is_launcher(_command_line(pid)):
            return True
        pid = _parent_of(pid)
    return False


def _arm_death_signal() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        log.warning("could not ask to die with torchrun (prctl: %s)", os.strerror(ctypes.get_errno()))
        return False
    return True


def _disarm_death_signal() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)


def die_with_launcher(env: Mapping[str, str] = os.environ) -> bool:
    """Under torchrun, have this process killed when the agent dies; return whether it was set up.
    A torchrun worker whose agent is already gone exits (SystemExit) instead of running on."""
    started_by_torchrun = "TORCHELASTIC_RUN_ID" in env
    if not sys.platform.startswith("linux") or not (started_by_torchrun or "LOCAL_RANK" in env):
        return False
    if not _arm_death_signal():  # armed first: from here on, the death of the parent is not missed
        return False
    if _launcher_among_ancestors(os.getppid()):
        return True  # the parent was alive after the request was in place
    if started_by_torchrun:
        print(
            f"error: torchrun's agent that started this worker (pid {os.getpid()}) is gone; exiting "
            "instead of training on alone",
            file=sys.stderr,
        )
        raise SystemExit(ORPHANED_EXIT_CODE)
    _disarm_death_signal()  # LOCAL_RANK alone: another launcher (or a shell), keep its usual lifetime
    return False
