"""Command line: `python -m pipeline validate|plan|run|status|submit MANIFEST` (also installed as `mcip`).

    python -m pipeline validate examples/demo.yaml
    python -m pipeline plan examples/demo.yaml
    python -m pipeline run examples/demo.yaml [--stage S | --from S] [--force] [--retry-failed] [--repair]
    python -m pipeline status examples/demo.yaml [--json]
    python -m pipeline export examples/demo.yaml --captions retrieval --to runs/demo-export
    python -m pipeline inspect examples/demo.yaml --captions retrieval [--shards 000000] [--samples 64]
    python -m pipeline submit examples/demo.yaml [--dry-run]     # SLURM: one job per stage (slurm_cli.py)
    python -m pipeline search|serve examples/demo.yaml --index mcip ...   # the index stage's (search_cli.py)

Exit code 0 on success; otherwise one line `error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

from pipeline import lifetime, logs, search_cli, slurm_cli
from pipeline.context import context_from_env
from pipeline.inputs import manifest_inputs
from pipeline.manifest import ManifestError, load_manifest
from pipeline.registry import STAGE_ORDER
from pipeline.runner import check_inputs, run_stages, select_stages, stage_status
from shards import identity
from stages.base import repair_hint
from stages.errors import StageError

log = logging.getLogger("pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcip", description="MCIP caption-shard pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("validate", "check the manifest and its inputs"),
        ("plan", "what would run: stages, units pending/done"),
        ("status", "per stage: units done/total, samples ok/failed"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("manifest")
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="machine-readable output")
    run = sub.add_parser("run", help="run the stages (resumes where they stopped)")
    run.add_argument("manifest")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--stage", choices=STAGE_ORDER, help="run only this stage")
    which.add_argument("--from", dest="start", choices=STAGE_ORDER, help="run this stage and the later ones")
    run.add_argument("--force", action="store_true", help="redo units made with other settings")
    run.add_argument(
        "--repair",
        action="store_true",
        help="redo the units whose files no longer match their markers (deleted, cut off, replaced)",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="download: re-download the rows that failed into extra shards; caption (server): send the "
        "images that failed again, rewriting their shards",
    )
    export = sub.add_parser("export", help="write images + one caption set as plain webdataset shards")
    export.add_argument("manifest")
    export.add_argument("--captions", required=True, metavar="SET", help="caption set (captions/<SET>)")
    export.add_argument("--to", required=True, type=Path, metavar="DIR", help="output folder")
    _add_inspect_parser(sub)
    slurm_cli.add_parsers(sub)
    search_cli.add_parsers(sub)
    return parser


def _add_inspect_parser(sub) -> None:
    inspect = sub.add_parser(
        "inspect", help="a static HTML page of images with their captions (or downloads)"
    )
    inspect.add_argument("manifest")
    what = inspect.add_mutually_exclusive_group()
    what.add_argument("--captions", metavar="SET", help="caption set (captions/<SET>)")
    what.add_argument("--download", action="store_true", help="the download alone (the default)")
    inspect.add_argument("--shards", metavar="LIST", help="comma-separated shards, e.g. 000000,000003")
    inspect.add_argument("--samples", type=int, default=64, metavar="N", help="images shown (default 64)")
    inspect.add_argument("--out", type=Path, metavar="DIR", help="default <root>/inspect/<what>/")


def main(argv: list[str] | None = None) -> int:
    lifetime.die_with_launcher()  # a torchrun worker must not outlive its agent (pipeline/lifetime.py)
    args = build_parser().parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        ctx = context_from_env(manifest.run.root, manifest.run.seed, force=getattr(args, "force", False))
        ctx = dataclasses.replace(ctx, repair=getattr(args, "repair", False))
        identity.use_cache_dir(os.environ.get("MCIP_CACHE_DIR") or Path.home() / ".cache" / "mcip-pipeline")
        logs.setup_logging(ctx.rank, ctx.world_size, args.verbose)
        return COMMANDS[args.command](args, manifest, ctx)
    except StageError as err:  # input or state a user can fix (stages/errors.py); anything else is a bug
        print(f"error: {_named(str(err), args)}", file=sys.stderr)
        return 2


def _named(text: str, args) -> str:
    """The repair command with this run's manifest path in it."""
    return text.replace(repair_hint(), repair_hint(getattr(args, "manifest", "MANIFEST")))


def _validate(args, manifest, ctx) -> int:
    check_inputs(manifest, deep=True)
    print(f"{args.manifest}: ok (stages: {', '.join(manifest.configured_stages()) or 'none'})")
    return 0


def _plan(args, manifest, ctx) -> int:
    check_inputs(manifest)
    print(f"run root: {manifest.run.root}")
    for name in manifest.configured_stages():
        status = stage_status(manifest, name)
        if status.waiting_for:
            print(f"{name}: waiting ({_named(status.waiting_for, args)})")
            continue
        more = f", {status.units_stale} made with other settings (need --force)" if status.units_stale else ""
        if status.damaged:
            more += f", {len(status.damaged)} damaged (need --repair)"
        print(
            f"{name}: {status.units_total} units, {status.units_done} done, "
            f"{status.units_total - status.units_done} pending{more}"
        )
        _print_damaged(status, args)
    return 0


DAMAGED_SHOWN = 10


def _print_damaged(status, args) -> None:
    """One indented line per damaged unit (the first few), then the command that redoes them."""
    for unit, problems in list(status.damaged.items())[:DAMAGED_SHOWN]:
        print(f"  damaged unit {unit}: {problems}")
    if len(status.damaged) > DAMAGED_SHOWN:
        print(f"  ... and {len(status.damaged) - DAMAGED_SHOWN} more damaged units")
    if status.damaged:
        print(f"  {repair_hint(args.manifest)} redoes them")


def _status(args, manifest, ctx) -> int:
    statuses = [stage_status(manifest, name) for name in manifest.configured_stages()]
    if args.json:
        for s in statuses:
            s.waiting_for = s.waiting_for and _named(s.waiting_for, args)
        print(json.dumps({s.stage: s.to_dict() for s in statuses}, indent=2))
        return 0
    extra = slurm_cli.job_lines(manifest.run.root, statuses)
    for s in statuses:
        print(
            f"{s.stage}: "
            + (f"waiting ({_named(s.waiting_for, args)})" if s.waiting_for else _status_line(s))
        )
        _print_damaged(s, args)
        for line in extra.get(s.stage, []):
            print(f"  {line}")
    return 0


def _status_line(s) -> str:
    counts = s.counts
    if s.stage == "download":
        samples = f"samples ok {counts.get('ok', 0)}, failed {counts.get('failed', 0)}"
    else:
        samples = ", ".join(
            f"{k.replace('_', ' ')} {v}" for k, v in counts.items() if not isinstance(v, dict)
        )
    damaged = f"; {len(s.damaged)} damaged" if s.damaged else ""
    return f"{s.units_done}/{s.units_total} units done; {samples}{damaged}" + (
        " [complete]" if s.is_complete else ""
    )


def _run(args, manifest, ctx) -> int:
    names = select_stages(manifest, args.stage, args.start)
    options = {}
    if args.retry_failed:
        if "download" not in names and "caption" not in names:
            raise ManifestError(
                "--retry-failed applies to the download and caption stages; neither is selected"
            )
        if "download" in names:
            options["download"] = {"retry_failed": True}
        # caption: failed images are the server backend's; with download selected too, others skip it
        if "caption" in names and (
            "download" not in names or manifest.stage_config("caption").backend == "server"
        ):
            options["caption"] = {"retry_failed": True}
    # SIGUSR1 (the SLURM launcher's "stop cleanly") interrupts a data stage like Ctrl-C: the unit in
    # progress is abandoned, its temporary files removed; training installs its own checkpointing handler.
    signal.signal(signal.SIGUSR1, signal.default_int_handler)
    try:
        run_stages(manifest, ctx, names, options, on_stage=logs.set_stage)
    except KeyboardInterrupt:
        log.warning("interrupted: the unit in progress was abandoned; a rerun resumes from the markers")
        return 130
    return 0


def _export(args, manifest, ctx) -> int:
    from stages.export import export_captions

    inputs = manifest_inputs(manifest, args.manifest)  # never written over (stages/targets.py)
    totals = export_captions(manifest.run.root, args.captions, args.to, inputs)
    print(f"exported {totals['samples']} samples in {totals['shards']} shards to {args.to}")
    return 0


def _inspect(args, manifest, ctx) -> int:
    from stages.inspect import build_page, parse_shards

    shards, inputs = parse_shards(args.shards), manifest_inputs(manifest, args.manifest)
    root = manifest.run.root
    page = build_page(root, args.captions, shards, args.samples, args.out, inputs, args.manifest)
    print(f"inspect page: {page}")
    return 0


COMMANDS = {
    "validate": _validate,
    "plan": _plan,
    "status": _status,
    "run": _run,
    "export": _export,
    "inspect": _inspect,
    "search": search_cli.search,
    "serve": search_cli.serve,
    "submit": slurm_cli.submit,
    "slurm-steps": slurm_cli.slurm_steps,
}
