"""The SLURM side of the command line: `submit`, the launcher's `slurm-steps`, and what `status`
adds per stage (job ids in the queue, failed units with their logs, samples/s of the last run).

    python -m pipeline submit MANIFEST [--stage S | --from S] [--dry-run]
    python -m pipeline slurm-steps MANIFEST [--stage S | --from S]   # used by launch/slurm_mcip.sh
"""

from __future__ import annotations

from pipeline import run_log, slurm
from pipeline.registry import STAGE_ORDER, stage_spec
from pipeline.runner import StageStatus, select_stages


def add_parsers(sub) -> None:
    for name, text in (
        ("submit", "submit one SLURM job per stage, chained with afterok"),
        ("slurm-steps", "the launcher's plan: '<stage> <data|training> <log dir>' per line"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("manifest")
        which = cmd.add_mutually_exclusive_group()
        which.add_argument("--stage", choices=STAGE_ORDER, help="only this stage")
        which.add_argument("--from", dest="start", choices=STAGE_ORDER, help="this stage and the later ones")
        if name == "submit":
            cmd.add_argument(
                "--dry-run", action="store_true", help="print the sbatch commands and the script"
            )


def submit(args, manifest, ctx) -> int:
    jobs = slurm.plan_jobs(manifest, args.manifest, select_stages(manifest, args.stage, args.start))
    if args.dry_run:
        print(slurm.dry_run_text(jobs))
        return 0
    for stage, job_id in slurm.submit(jobs, manifest.run.root).items():
        print(f"{stage}: job {job_id}")
    return 0


def slurm_steps(args, manifest, ctx) -> int:
    for stage in select_stages(manifest, args.stage, args.start):
        print(stage, stage_spec(stage).kind, slurm.log_dir(manifest.run.root, stage))
    return 0


def job_lines(root, statuses: list[StageStatus]) -> dict[str, list[str]]:
    """Extra status lines per stage; empty for a run that never met SLURM or a runs log."""
    jobs = slurm.read_jobs(root)
    states = slurm.job_states([j["job_id"] for j in jobs.values()])
    lines: dict[str, list[str]] = {}
    for s in statuses:
        extra = []
        job = jobs.get(s.stage)
        running = job is not None and job["job_id"] in states
        if running:
            extra.append(f"job {job['job_id']} {states[job['job_id']]}")
        runs = run_log.last_runs(root, s.stage)
        rate = run_log.samples_per_second(runs)
        if rate is not None:
            extra.append(f"last run {rate:.1f} samples/s")
        if runs and not running and s.pending and not s.waiting_for:
            logs = run_log.unit_logs(s.units, s.pending, runs)
            failed = ", ".join(
                f"{u} (log: {path or 'local run, no log file'})" for u, path in list(logs.items())[:10]
            )
            more = f" and {len(logs) - 10} more" if len(logs) > 10 else ""
            extra.append(f"not done after the last run: {failed}{more}")
        lines[s.stage] = extra
    return lines
