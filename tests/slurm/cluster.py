"""The tests' own SLURM (Debian's slurm-wlm + munge on localhost; one node, or several slurmd on this one
host) and helpers to drive it.

`start-local-slurm.sh` / `stop-local-slurm.sh` beside this file come from the reference scripts
handed to the project (install when missing, `cred_expire=5` and a fast scheduler so a requeued job
restarts in ~6 s, leftover job processes swept on stop).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, STOP = HERE / "start-local-slurm.sh", HERE / "stop-local-slurm.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.env = {
            **os.environ,
            "SLURM_LOCAL_DIR": str(self.folder),
            "SLURM_LOCAL_CPUS": "8",
            "SLURM_LOCAL_CLEAN": "1",
            "SLURM_LOCAL_WAIT": "60",
        }

    def start(self, nodes: int = 1) -> str | None:
        """None when the cluster is up, else why it cannot be (e.g. no root, no apt). With `nodes` > 1,
        that many nodes on this host (one slurmd each); started again with another number, the
        daemons restart with the new configuration."""
        if os.geteuid() != 0:
            return "needs root (apt-get, munged as user munge, SlurmUser=root)"
        env = {**self.env, "SLURM_LOCAL_NODES": str(nodes)}
        done = subprocess.run([str(START)], env=env, capture_output=True, text=True, timeout=600)
        return None if done.returncode == 0 else f"start-local-slurm.sh failed: {done.stderr.strip()[-800:]}"

    def stop(self) -> None:
        subprocess.run([str(STOP)], env=self.env, capture_output=True, text=True, timeout=120)

    @property
    def conf(self) -> str:
        return str(self.folder / "etc" / "slurm.conf")

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**extra, "SLURM_CONF": self.conf}

    def run(self, *command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(command), env={**env, "SLURM_CONF": self.conf}, capture_output=True, text=True, timeout=120
        )

    def job(self, job_id: str, env: dict[str, str]) -> dict[str, str]:
        """`scontrol show job` fields (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, env=env).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_final(self, job_id: str, env: dict[str, str], timeout: float = 600) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            fields = self.job(job_id, env)
            if fields.get("JobState") in FINAL_STATES:
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {self.job(job_id, env)}")

    def ended(self, job_id: str, env: dict[str, str]):
        return lambda: self.job(job_id, env).get("JobState") in FINAL_STATES

    def signal_batch(self, job_id: str, env: dict[str, str], signal: str = "USR1") -> None:
        """What SLURM sends before a time limit or on preemption, delivered now."""
        done = self.run("scancel", "--batch", f"--signal={signal}", job_id, env=env)
        assert done.returncode == 0, done.stderr


def wait_until(predicate, timeout: float = 300, what: str = "condition", gave_up=None) -> None:
    """Poll `predicate`; fail early when `gave_up()` says it cannot happen any more (job ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if gave_up is not None and gave_up():
            raise AssertionError(f"{what}: the job ended first")
        time.sleep(0.2)
    raise TimeoutError(f"{what} not met within {timeout} s")
