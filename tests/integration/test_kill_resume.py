"""kill -9 at seeded moments, three times per stage, then a rerun gives what an uninterrupted run gives
(issue 15), for every stage: download -> caption -> finetune -> realign -> evaluate.

One tiny run is made once for the module in one `pipeline run` (pictures served from 127.0.0.1, the
retrieval captioner and MCIP training with a tiny open_clip model, evaluate on the run's own shards),
watching when each stage starts and when each of its units appears. Then, per stage, the run root as
it was before that stage is put back in the same place (same absolute paths and mtimes, so every
fingerprint is comparable), the stage is started in a process group of its own and the group is
SIGKILLed at a seeded moment, restarted, killed again, ..., three kills, then left to finish. The run
root must then equal the uninterrupted one by content: tar members (names, bytes), parquet rows, the
tensors of every torch file (final models and checkpoints), npy arrays, JSON and JSON lines without
their time fields (markers' `finished_at` and `mtime_ns`, metrics' `seconds`), other files byte for
byte. Not compared: `logs/`, TensorBoard event files (wall times), and of `manifest.resolved.yaml`
only the stages it lists (a stage-by-stage run lists fewer than the full run does). And no unit
finished before a kill may be done again: its marker keeps its mtime.

A kill moment: an anchor, the stage's `stage S: start` log line or the k-th unit this run adds (a
marker; for finetune a checkpoint; for realign a shard's image embeddings, then a checkpoint), plus
a delay below half the time the uninterrupted run took from that point to the next unit; k and the
delay come from `random.Random(f"{stage}-{i}")`. Only the last kill may come after the last unit
(in the closing work: final export, report, `_SUCCESS.json`), so every kill finds the stage still
running. The first kill of a training stage comes after its first unit. A kill before the stage
wrote anything still counts. The kills, and what each left, are in the assertion messages (and
printed with `-s`).

Known bugs would be marked xfail(strict=True) in XFAIL.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from examples.image_server import ImageServer
from tests.conftest import cli_env, write_url_table
from tests.helpers.kill_resume import CliRun, content_differences, first_difference, tree_content

STAGES = ("download", "caption", "finetune", "realign", "evaluate")
TRAINING = ("finetune", "realign")
# where each stage writes, by the run root's top-level names
OUTPUTS = {
    "download": ("images",),
    "caption": ("captions", "caption_bank"),
    "finetune": ("finetune",),
    "realign": ("realign", "embeddings"),
    "evaluate": ("evaluate",),
}
RESOLVED = "manifest.resolved.yaml"
NOT_COMPARED = ("logs", "tensorboard")
KILLS = 3
MARGIN = 0.5  # a delay stays below this part of the time to the next unit
ROWS, PER_SHARD = 20, 5
LABELS = ("cat", "dog", "eel")
XFAIL: dict[str, str] = {}  # stage -> a difference that is a bug in stage code, until it is fixed
# The output each stage writes last; test_a_rerun_removes_the_temporary_files_a_kill_left plants the
# temporary file a kill mid-write leaves beside it (DESIGN.md: orphans are removed on start).
LEAVES_ORPHANS = {
    "finetune": "finetune/mcip/final/model.pt",
    "realign": "realign/mcip/final/model.pt",
    "evaluate": "evaluate/tiny/metrics/mcip+re-a.json",
}


def _manifest(folder: Path, server: ImageServer, tiny_models: dict) -> Path:
    write_url_table(
        folder / "urls.parquet",
        [server.url(f"/img/{i}.jpg") for i in range(ROWS)],
        [f"alt {i}" for i in range(ROWS)],
        [LABELS[i % len(LABELS)] for i in range(ROWS)],
    )
    colours, shapes = ("red", "blue", "green", "cyan"), ("circle", "square", "shape")
    (folder / "bank.txt").write_text("\n".join(f"a {c} {s}" for c in colours for s in shapes) + "\n")
    (folder / "classes.json").write_text(json.dumps({label: f"a {label}" for label in LABELS}))
    clip = {"model": tiny_models["clip_arch"], "config_dir": str(tiny_models["clip_configs"])}
    checkpoint = str(tiny_models["clip_checkpoint"])
    shards = {"layout": "shards"}
    stages = {
        "download": {
            "url_list": "urls.parquet",
            "caption_col": "caption",
            "label_col": "label",
            "samples_per_shard": PER_SHARD,
            "processes": 1,
            "threads": 2,
            "image_size": 32,
        },
        "caption": {
            "backend": "retrieval",
            "model": clip["model"],
            "captions_per_image": 3,
            "batch_size": 4,
            "num_workers": 1,
            "retrieval": {
                "pretrained": checkpoint,
                "bank": "bank.txt",
                "config_dir": clip["config_dir"],
                "threshold": -1.0,
            },
        },
        "finetune": {  # 20 images, batch 4: 5 steps an epoch, 20 steps, checkpoints at 4, 8, ... 20
            **clip,
            "pretrained": checkpoint,
            "loss": "mcip",
            "captions": "retrieval",
            "captions_per_image": 3,
            "batch_size": 4,
            "epochs": 4,
            "lr": 1e-3,
            "checkpoint_every": 4,
            "num_workers": 1,  # the kill takes the DataLoader worker too
        },
        "realign": {  # 10 steps, checkpoints at 3, 6, 9, 10
            "batch_size": 4,
            "epochs": 2,
            "max_steps": 10,
            "lr": 2e-3,
            "checkpoint_every": 3,
            "num_workers": 1,
        },
        "evaluate": {
            "name": "tiny",
            **clip,
            "models": [
                {"name": "baseline", "checkpoint": checkpoint},
                {"name": "mcip", "stage": "finetune/mcip"},
                {"name": "mcip+re-a", "stage": "realign/mcip"},
            ],
            "retrieval": {"run": shards},
            "knn": {"data": shards, "k": 5},
            "zero_shot": {"data": shards, "class_names": "classes.json", "templates": ["a photo of {}."]},
            "text_to_image": {"layout": "shards"},
            "batch_size": 8,
            "num_workers": 0,
        },
    }
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"run": {"root": "run", "seed": 0}, "stages": stages}))
    return path


def _env() -> dict[str, str]:
    return cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the same thread count in every run


def _stage_dir(root: Path, stage: str) -> Path:
    folder = {"caption": "captions/retrieval", "finetune": "finetune/mcip", "realign": "realign/mcip"}
    return root / {"download": "images", "evaluate": "evaluate/tiny"}.get(stage, folder.get(stage, ""))


def _units(root: Path, stage: str) -> set[str]:
    """The stage's finished units: its markers; for training its complete checkpoints, after (for
    realign) the markers of its image embeddings, one per shard."""
    if stage == "realign":
        embedded = {f"embeddings/{p.name}" for p in (root / "embeddings" / "mcip").glob("_done/*.json")}
        return embedded | {
            f"ckpt/{p.parent.name}" for p in _stage_dir(root, stage).glob("ckpt/step-*/meta.json")
        }
    if stage == "finetune":
        return {f"ckpt/{p.parent.name}" for p in _stage_dir(root, stage).glob("ckpt/step-*/meta.json")}
    return {p.name for p in _stage_dir(root, stage).glob("_done/*.json")}


def _done_count(stage: str, present: set[str], units: set[str]) -> int:
    """How many of the uninterrupted run's `units` are behind a run root holding `present`: every
    checkpoint up to the newest one counts (older ones were pruned, not lost)."""
    newest = max((u for u in present if u.startswith("ckpt/")), default="")
    return len([u for u in units if u in present or u.startswith("ckpt/") and u <= newest])


def _state(root: Path, stage: str) -> str:
    units = sorted(_units(root, stage))
    steps = [int(u.removeprefix("ckpt/step-")) for u in units if u.startswith("ckpt/")]
    if stage == "realign":
        embedded = len([u for u in units if u.startswith("embeddings/")])
        return f"{embedded} shards embedded, checkpoints at {steps}, final {_has_final(root, stage)}"
    if stage == "finetune":
        return f"checkpoints at {steps}, final {_has_final(root, stage)}"
    return f"{len(units)} units done"


def _has_final(root: Path, stage: str) -> bool:
    return (_stage_dir(root, stage) / "final" / "model.pt").exists()


@dataclass
class Timing:
    """When the uninterrupted run reached each point of one stage (monotonic seconds)."""

    start: float | None = None  # the `stage S: start` line
    units: dict[str, float] = field(default_factory=dict)  # unit -> when it first appeared
    end: float | None = None  # the `stage S: end` line

    def gap_s(self, index: int) -> float:
        """The time the uninterrupted run took to reach unit `index` (in order of appearance) from
        the unit before it (from the start line for the first one, to the end line after the last)."""
        times = [self.start, *sorted(self.units.values()), self.end]
        return times[index + 1] - times[index]


@dataclass
class Straight:
    """The uninterrupted run: the live run root's folder, a copy of the finished root, timings."""

    folder: Path
    manifest: Path
    timings: dict[str, Timing]
    _expected: dict[str, object] = field(default_factory=dict)  # the finished root's content

    @property
    def root(self) -> Path:
        return self.folder / "run"

    @property
    def finished(self) -> Path:
        return self.folder / "finished"

    def restore_before(self, stage: str) -> None:
        """The live root as it was before `stage` ran, at the same path with the same mtimes."""
        later = {name for s in STAGES[STAGES.index(stage) :] for name in OUTPUTS[s]}
        shutil.rmtree(self.root, ignore_errors=True)
        if stage != STAGES[0]:
            shutil.copytree(
                self.finished,
                self.root,
                ignore=lambda where, names: [
                    n for n in names if Path(where) == self.finished and n in {*later, "logs", RESOLVED}
                ],
            )

    def expected(self, stage: str) -> dict:
        """The content of the root after `stage`: the outputs of the stages up to it."""
        if not self._expected:  # read once
            everything = {name for names in OUTPUTS.values() for name in names}
            self._expected.update(tree_content(self.finished, lambda p: _compared(p, everything)))
        mine = {name for s in STAGES[: STAGES.index(stage) + 1] for name in OUTPUTS[s]}
        return {path: value for path, value in self._expected.items() if Path(path).parts[0] in mine}


def _compared(relative: Path, top_level: set[str], orphans_too: bool = True) -> bool:
    if not orphans_too and _is_orphan(relative):
        return False
    return relative.parts[0] in top_level and not set(NOT_COMPARED) & set(relative.parts)


def _is_orphan(relative: Path) -> bool:
    """A temporary file of shards/atomic.py (`.<name>.<12 hex>.tmp`), left by a kill mid-write."""
    return relative.name.startswith(".") and relative.name.endswith(".tmp")


@pytest.fixture(scope="module")
def server():
    with ImageServer() as served:
        yield served


@pytest.fixture(scope="module")
def straight(tmp_path_factory, server, tiny_models) -> Straight:
    folder = tmp_path_factory.mktemp("kill-resume")
    manifest = _manifest(folder, server, tiny_models)
    root, timings = folder / "run", {stage: Timing() for stage in STAGES}
    run = CliRun(["run", str(manifest)], folder, folder / "straight.log", _env())
    while True:
        is_running, text, now = run.is_running(), run.text(), time.monotonic()
        for stage, timing in timings.items():
            if timing.start is None and f"stage {stage}: start" in text:
                timing.start = now
            if timing.end is None and f"stage {stage}: end" in text:
                timing.end = now
            for unit in _units(root, stage) if timing.start is not None else ():
                timing.units.setdefault(unit, now)
        if not is_running:
            break
        time.sleep(0.01)
    assert run.finish() == 0, run.tail()
    unknown = {p.name for p in root.iterdir()} - {n for names in OUTPUTS.values() for n in names}
    assert unknown <= {"logs", RESOLVED}, f"outputs no stage claims: {unknown}"
    for stage, timing in timings.items():
        assert None not in (timing.start, timing.end) and timing.units, (stage, run.tail())
    shutil.copytree(root, folder / "finished")
    return Straight(folder, manifest, timings)


def _nothing_left(straight: Straight, stage: str) -> bool:
    timing = straight.timings[stage]
    return _done_count(stage, _units(straight.root, stage), set(timing.units)) >= len(timing.units)


def _kill(straight: Straight, stage: str, attempt: int, log: Path) -> str:
    """Start the stage and SIGKILL its group at the seeded moment; what happened, for the messages."""
    rng = random.Random(f"{stage}-{attempt}")
    timing, before = straight.timings[stage], _units(straight.root, stage)
    done = _done_count(stage, before, set(timing.units))
    left = len(timing.units) - done
    assert left >= 1, f"{stage}: nothing left to do before kill {attempt}"
    lowest = 1 if stage in TRAINING and attempt == 0 and left >= 2 else 0  # not while building
    k = rng.randint(lowest, left if attempt == KILLS - 1 else left - 1)  # k = left: in the closing work
    run = CliRun(["run", str(straight.manifest), "--stage", stage], straight.folder, log, _env())
    if k == 0:  # before the next unit, which may come sooner than the first did (no model to build)
        anchor, window = "start line", min(timing.gap_s(0), timing.gap_s(done))
        anchor_at = run.wait_for(lambda: f"stage {stage}: start" in run.text())
    else:
        anchor, window = f"unit {k} of this run", timing.gap_s(done + k)
        anchor_at = run.wait_for(lambda: len(_units(straight.root, stage) - before) >= k)
    delay = rng.uniform(0, MARGIN * window)
    was_running = anchor_at is not None and run.kill_at(anchor_at + delay)
    state = "killed" if was_running else "NOT KILLED: it had exited"
    return f"#{attempt} {anchor} + {delay:.3f} s: {state}, left {_state(straight.root, stage)}"


def _markers(root: Path, stage: str) -> dict[str, int]:
    """Every unit marker of the stage (`_done/*.json`, with realign's embeddings and the caption
    bank's chunks) and its mtime."""
    found = (p for name in OUTPUTS[stage] for p in (root / name).glob("**/_done/*.json"))
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in found}


def _resolved_problems(straight: Straight, stage: str) -> list[str]:
    """The killed run's resolved manifest equals the full run's, but for the stages it lists."""
    full = yaml.safe_load((straight.finished / RESOLVED).read_text())
    ours = yaml.safe_load((straight.root / RESOLVED).read_text())
    listed = ours.pop("fingerprints")
    expected = {s: full["fingerprints"][s] for s in listed if s in full["fingerprints"]}
    problems = [] if stage in listed else [f"{RESOLVED}: no fingerprint for {stage}"]
    if listed != expected:
        problems.append(f"{RESOLVED}: fingerprints {first_difference(expected, listed)}")
    full.pop("fingerprints")
    if ours != full:
        problems.append(f"{RESOLVED}: {first_difference(full, ours)}")
    return problems


@pytest.mark.parametrize(
    "stage",
    [
        pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=XFAIL[s])) if s in XFAIL else s
        for s in STAGES
    ],
)
def test_killed_three_times_then_rerun_equals_uninterrupted(straight, stage):
    """Three seeded kills, then a rerun: the uninterrupted content, and no unit that was done before
    a kill done again (its marker is not rewritten)."""
    straight.restore_before(stage)
    began, log = time.monotonic(), straight.folder / f"killed-{stage}.log"
    kills, kept = [], {}  # markers left by the kills: path -> mtime
    for attempt in range(KILLS):
        if _nothing_left(straight, stage):  # units can land together (download): the last kill came
            straight.restore_before(stage)  # after them, so the next kills start the stage afresh
            kills.append("(the stage had finished its units: restarted from before the stage)")
            kept = {}
        kills.append(_kill(straight, stage, attempt, log))
        for path, mtime in _markers(straight.root, stage).items():
            kept.setdefault(path, mtime)
    final = CliRun(["run", str(straight.manifest), "--stage", stage], straight.folder, log, _env())
    code = final.finish()
    where = f"stage {stage}, kills seeded {stage}-0..{KILLS - 1}: " + "; ".join(kills)
    print(f"\n{stage}: {time.monotonic() - began:.1f} s for {KILLS} kills and the rerun; {where}")
    assert code == 0, f"{where}\n{final.tail()}"
    assert all(": killed," in k for k in kills if k.startswith("#")), (
        f"a kill came after the stage ended: {where}"
    )
    now = _markers(straight.root, stage)
    redone = sorted(path for path, mtime in kept.items() if now.get(path) != mtime)
    assert not redone, f"{where}\nunits done before a kill were done again: {redone}"
    mine = {name for s in STAGES[: STAGES.index(stage) + 1] for name in OUTPUTS[s]}
    orphans = sorted(str(p.relative_to(straight.root)) for p in straight.root.rglob(".*.tmp"))
    assert not orphans, f"{where}\ntemporary files left after the rerun: {orphans}"
    actual = tree_content(straight.root, lambda p: _compared(p, mine, True))
    differences = content_differences(straight.expected(stage), actual) + _resolved_problems(straight, stage)
    assert not differences, f"{where}\n" + "\n".join(differences[:30])


def test_a_rerun_removes_the_temporary_files_a_kill_left(straight):
    """The state a kill leaves mid-write of each stage's last output (its marker not yet written,
    the half-written temporary beside the file), for finetune, realign and evaluate at once: a rerun
    from finetune ends with the uninterrupted content and no temporary file left."""
    straight.restore_before(STAGES[-1])
    shutil.copytree(straight.finished / "evaluate", straight.root / "evaluate")
    root, planted = straight.root, []
    for stage, output in LEAVES_ORPHANS.items():
        folder, target = _stage_dir(root, stage), root / output
        unit = "final" if stage in TRAINING else target.stem
        for done in (folder / "_done" / f"{unit}.json", folder / "_SUCCESS.json"):
            done.unlink()
        orphan = target.with_name(f".{target.name}.0123456789ab.tmp")
        orphan.write_bytes(target.read_bytes()[:1000])
        target.unlink()
        planted.append(str(orphan.relative_to(root)))
    run = CliRun(
        ["run", str(straight.manifest), "--from", "finetune"],
        straight.folder,
        straight.folder / "orphans.log",
        _env(),
    )
    if run.finish() != 0:
        pytest.fail(run.tail())
    everything = {name for names in OUTPUTS.values() for name in names}
    differences = content_differences(
        straight.expected(STAGES[-1]), tree_content(root, lambda p: _compared(p, everything, False))
    )
    if differences:
        pytest.fail("\n".join(differences[:30]))
    left = [p for p in planted if (root / p).exists()]
    assert not left, f"temporary files a kill left survive the rerun: {left}"
