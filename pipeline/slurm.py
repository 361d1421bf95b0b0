"""SLURM jobs for a manifest: one batch job per stage, chained with `--dependency=afterok`.

    python -m pipeline submit MANIFEST [--from S | --stage S] [--dry-run]

Every job runs `launch/slurm_mcip.sh MANIFEST --stage S` with the stage's resources from the
manifest's `slurm:` section (pipeline/slurm_config.py). Job ids go to `<root>/slurm/jobs.json`, so
`status` can show the running ones. Logs: `<root>/logs/<stage>/slurm-<job>.out` (the batch script)
and `<root>/logs/<stage>/<job>-task<N>.log` (one per task, appended to after a requeue).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from pipeline.manifest import Manifest
from pipeline.registry import stage_spec
from pipeline.slurm_config import SlurmResources
from shards.atomic import write_json_atomic
from shards.marker_schema import schema_problem
from stages.errors import StageError
from stages.layout import RunLayout

LAUNCHER = Path(__file__).resolve().parents[1] / "launch" / "slurm_mcip.sh"


class SlurmError(StageError):
    """sbatch/squeue missing or refusing a job; the message says which command and why."""


def log_dir(root: Path, stage: str) -> Path:
    return RunLayout(root).logs(stage)


def jobs_file(root: Path) -> Path:
    return RunLayout(root).slurm_jobs


@dataclass
class SlurmJob:
    stage: str
    options: list[str]  # sbatch options without the dependency
    arguments: list[str]  # the launcher and its arguments
    pending: str  # what is left to do, for --dry-run

    def command(self, after: str | None = None) -> list[str]:
        dependency = [f"--dependency=afterok:{after}"] if after else []
        return ["sbatch", "--parsable", *self.options, *dependency, *self.arguments]


def sbatch_options(stage: str, res: SlurmResources, root: Path) -> list[str]:
    """Resources, requeue and signal settings, logs and the environment the launcher reads."""
    array = res.array is not None
    output = log_dir(Path(root).resolve(), stage) / ("slurm-%A_%a.out" if array else "slurm-%j.out")
    options = [
        f"--job-name=mcip-{stage}",
        "--requeue",
        "--open-mode=append",
        f"--signal=B:USR1@{res.signal_lead}",
        f"--nodes={res.nodes}",
        f"--ntasks-per-node={res.tasks_per_node}",
        f"--output={output}",
    ]
    options += [
        f"--{flag}={value}"
        for flag, value in (
            ("partition", res.partition),
            ("account", res.account),
            ("cpus-per-task", res.cpus_per_task),
            ("mem", res.mem),
            ("time", res.time),
        )
        if value is not None
    ]
    if res.gpus_per_node:
        options.append(f"--gpus-per-node={res.gpus_per_node}")
    if array:
        options.append(f"--array=0-{res.array - 1}")
    env = {
        "MCIP_MAX_REQUEUES": res.max_requeues,
        "MCIP_NPROC_PER_NODE": res.processes_per_node,
        "MCIP_PYTHON": sys.executable,
    }
    options.append("--export=ALL," + ",".join(f"{k}={v}" for k, v in env.items()))
    return options + list(res.extra)


def plan_jobs(manifest: Manifest, manifest_path: Path, names: list[str]) -> list[SlurmJob]:
    from pipeline.runner import stage_status

    jobs = []
    for stage in names:
        state = stage_status(manifest, stage)
        pending = (
            f"waiting for its input ({state.waiting_for})"
            if state.waiting_for
            else f"{len(state.pending)} of {state.units_total} units pending"
        )
        options = sbatch_options(stage, manifest.slurm.resources(stage), manifest.run.root)
        jobs.append(
            SlurmJob(
                stage, options, [str(LAUNCHER), str(Path(manifest_path).resolve()), "--stage", stage], pending
            )
        )
    return jobs


def dry_run_text(jobs: list[SlurmJob]) -> str:
    """Every sbatch command, dependencies as `$JOB_<previous stage>`, and the launcher script."""
    lines, previous = [], None
    for job in jobs:
        kind = "torchrun per node" if stage_spec(job.stage).kind == "training" else "tasks share the units"
        lines.append(f"# {job.stage}: {job.pending} ({kind})")
        after = f"$JOB_{previous.upper()}" if previous else None
        lines.append(
            f"JOB_{job.stage.upper()}=$("
            + shlex.join(job.command(after)).replace(
                shlex.quote(f"--dependency=afterok:{after}"), f"--dependency=afterok:{after}"
            )
            + ")"
        )
        previous = job.stage
    return "\n".join(lines) + f"\n\n# {LAUNCHER}:\n" + LAUNCHER.read_text()


def submit(jobs: list[SlurmJob], root: Path) -> dict[str, str]:
    """Submit in order, each after the previous one; record the job ids."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found: submit needs a SLURM client on PATH (try --dry-run)")
    ids: dict[str, str] = {}
    previous = None
    for job in jobs:
        log_dir(root, job.stage).mkdir(parents=True, exist_ok=True)
        done = subprocess.run(job.command(previous), capture_output=True, text=True)
        if done.returncode != 0:
            raise SlurmError(
                f"sbatch refused the {job.stage} job: {done.stderr.strip() or done.stdout.strip()}"
            )
        previous = ids[job.stage] = done.stdout.strip().split(";")[0]
    record = read_jobs(root)
    record.update({stage: {"job_id": job_id, "submitted_at": time.time()} for stage, job_id in ids.items()})
    write_json_atomic(jobs_file(root), record)
    return ids


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    job_id: str
    submitted_at: float | None = None


_JOBS = TypeAdapter(dict[str, JobRecord])


def read_jobs(root: Path) -> dict[str, dict]:
    """The jobs `submit` recorded, by stage; a damaged record is a one-line error naming the file."""
    path = jobs_file(root)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        _JOBS.validate_python(data)
    except ValidationError as err:
        raise StageError(
            f"{path}: not a record of submitted jobs ({schema_problem(err)}); delete it"
        ) from None
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError, a folder
        why = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
        raise StageError(f"{path}: not a record of submitted jobs ({why}); delete it") from None
    return data


ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Job id -> state of those of `job_ids` that are still queued or running; empty without squeue.
    The whole queue is listed and filtered here: `squeue -j` fails outright on one purged id."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    done = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True)
    wanted, states = set(job_ids), {}
    for line in done.stdout.splitlines():
        job, _, state = line.partition(" ")
        job = job.split("_")[0]  # array tasks report as <id>_<index>
        if job in wanted and state in ACTIVE_STATES:
            states[job] = state
    return states
