"""Issue 15's bad-input suite: one bad input per case, across every stage, through the real CLI.

One complete tiny run (download with img2dataset against 127.0.0.1, caption by caption-bank
retrieval, finetune, realign, evaluate; tests/helpers/bad_inputs.py) is made once for the module.
Each case copies it, applies one bad input (a manifest value, a damaged file, an environment
variable), calls `pipeline.cli.main` in this process and asserts: exit code 2; one `error:` line on
stderr, the last one, no traceback, naming the file, key or value; and every file of the run root
(except logs/ and the damaged files) byte for byte as it was. Config-level cases use `validate`;
damage on disk uses `run --stage <the stage that meets it>`.

    .venv/bin/python -m pytest tests/component/test_bad_inputs.py -q
"""

from __future__ import annotations

import html
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from examples.image_server import ImageServer
from pipeline.cli import main as cli
from shards import identity
from tests.helpers.bad_inputs import DELETE, changed, copy_made, digests, make_complete_run, write_manifest

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_ARRAY_TASK_ID")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The complete run (`made`), its assets and manifest data, and the file-hash cache folder."""
    base = tmp_path_factory.mktemp("bad-inputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MCIP_CACHE_DIR", str(base / "cache"))
        for name in RANK_VARIABLES:
            patch.delenv(name, raising=False)
        with ImageServer() as server:
            run = make_complete_run(base, server)
    return {**run, "cache": base / "cache"}


# ---- the cases -------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What a damage function gets: the copied folder, its run root and the module's assets."""

    folder: Path
    run: Path
    assets: dict[str, Any]


Damage = Callable[[Ctx], list[Path]]  # returns the files it damaged (left out of the comparison)


@dataclass
class Case:
    command: list[str]  # e.g. ["validate"] or ["run", "--stage", "download"]
    expect: tuple[str, ...]  # substrings of the error line; <run>, <folder>, ASSETS_EVAL filled in
    change: dict[str, Any] = field(default_factory=dict)  # manifest keys (dotted) -> new values
    damage: Damage | None = None
    env: dict[str, str] = field(default_factory=dict)
    manifest_text: str | None = None  # the manifest file's whole text, instead of the changed data


def case(id_: str, command: str, expect, change=None, damage=None, env=None, text=None, xfail=None):
    expected = (expect,) if isinstance(expect, str) else tuple(expect)
    value = Case(command.split(), expected, change or {}, damage, env or {}, text)
    reason = xfail or XFAILS.get(id_)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(value, id=id_, marks=marks)


# Cases that fail today, what happens instead and where the fix belongs (strict: they turn into
# failures once fixed, so the entry is removed then).
XFAILS: dict[str, str] = {}

VALIDATE = "validate"
RUN_DOWNLOAD = "run --stage download"
RUN_CAPTION = "run --stage caption"
RUN_FINETUNE = "run --stage finetune"
RUN_REALIGN = "run --stage realign"
RUN_EVALUATE = "run --stage evaluate"


# ---- damage functions ------------------------------------------------------------------------------


def _cut(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def cut(relative: str, keep: float = 0.5) -> Damage:
    """The run root's file `relative` cut off (a crash mid-write, a full disk)."""
    return lambda c: [_cut(_one(c.run, relative), keep)]


def cut_all(pattern: str, keep: float = 0.5) -> Damage:
    def apply(c: Ctx) -> list[Path]:
        paths = sorted(c.run.glob(pattern))
        assert paths, pattern
        return [_cut(p, keep) for p in paths]

    return apply


def delete(*relatives: str) -> Damage:
    def apply(c: Ctx) -> list[Path]:
        paths = [_one(c.run, r) for r in relatives]
        for path in paths:
            path.unlink()
        return paths

    return apply


def both(*damages: Damage) -> Damage:
    return lambda c: [p for d in damages for p in d(c)]


def _one(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


def replace_tar(c: Ctx) -> list[Path]:
    """000000.tar replaced by 000001.tar (same size: tars are padded to 10 KiB records)."""
    shutil.copyfile(c.run / "images" / "000001.tar", c.run / "images" / "000000.tar")
    return [c.run / "images" / "000000.tar"]


def garbage_parquet(relative: str) -> Damage:
    def apply(c: Ctx) -> list[Path]:
        path = c.run / relative
        path.write_bytes(b"\0" * path.stat().st_size)
        return [path]

    return apply


def cut_last_line(relative: str) -> Damage:
    def apply(c: Ctx) -> list[Path]:
        path = c.run / relative
        lines = path.read_text().splitlines(keepends=True)
        last = lines[-1].rstrip("\n")
        path.write_text("".join(lines[:-1]) + last[: len(last) // 2])  # a writer killed mid-line
        return [path]

    return apply


def write(name: str, content: bytes | str | Callable[[Path], None]) -> Damage:
    """An input file `<folder>/<name>` (not part of the run root)."""

    def apply(c: Ctx) -> list[Path]:
        path = c.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return []

    return apply


def parquet(columns: dict[str, Any]) -> Callable[[Path], None]:
    return lambda path: pq.write_table(pa.table(columns), path)


def eval_copy_with_bad_image(c: Ctx) -> list[Path]:
    shutil.copytree(c.assets["eval"], c.folder / "eval")
    (c.folder / "eval" / "red" / "1.jpg").write_bytes(b"not a jpeg at all")
    return []


def as_folder(relative: str) -> Damage:
    """The run root's file `relative` replaced by a folder of that name (a stray `mkdir`)."""

    def apply(c: Ctx) -> list[Path]:
        path = c.run / relative
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True)
        return [path]

    return apply


def as_file(relative: str) -> Damage:
    """The run root's folder `relative` replaced by an empty file."""

    def apply(c: Ctx) -> list[Path]:
        path = c.run / relative
        shutil.rmtree(path)
        path.write_bytes(b"")
        return [path]

    return apply


def json_file(relative: str, value: Any) -> Damage:
    """The run root's file `relative` (a glob with one match, or a new file) holding `value` as JSON."""

    def apply(c: Ctx) -> list[Path]:
        found = sorted(c.run.glob(relative))
        path = found[0] if found else c.run / relative
        assert len(found) <= 1, found
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
        return [path]

    return apply


def edit_json(relative: str, edit: Callable[[Any], Any]) -> Damage:
    """The run root's JSON file `relative` rewritten as `edit(its data)`."""

    def apply(c: Ctx) -> list[Path]:
        path = _one(c.run, relative)
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        return [path]

    return apply


def without(key: str) -> Callable[[dict], dict]:
    return lambda data: {k: v for k, v in data.items() if k != key}


def with_value(key: str, value: Any) -> Callable[[dict], dict]:
    return lambda data: {**data, key: value}


def copied(source: str, target: str) -> Damage:
    def apply(c: Ctx) -> list[Path]:
        shutil.copyfile(c.run / source, c.run / target)
        return [c.run / target]

    return apply


def symlink(relative: str, points_to: str) -> Damage:
    """A symlink `<folder>/<relative>` (replacing a file there) pointing at `points_to`."""

    def apply(c: Ctx) -> list[Path]:
        link = c.folder / relative
        link.unlink(missing_ok=True)
        link.symlink_to(points_to)
        return [link] if link.is_relative_to(c.run) else []

    return apply


def make_dirs(relative: str) -> Damage:
    """A folder `<folder>/<relative>` outside the run root."""

    def apply(c: Ctx) -> list[Path]:
        (c.folder / relative).mkdir(parents=True)
        return []

    return apply


def edited_keeping_mtime(relative: str) -> Damage:
    """One letter of a caption changed in the file's bytes (same size), the mtime put back: only a
    check of the bytes themselves can see it."""

    def apply(c: Ctx) -> list[Path]:
        path = c.run / relative
        stat, data = path.stat(), bytearray(path.read_bytes())
        at = next(i for word in (b"red", b"green", b"blue") if (i := data.find(word)) >= 0)
        data[at] ^= 0x20  # "red" -> "Red"
        path.write_bytes(bytes(data))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return [path]

    return apply


def legacy_caption_shard_of_numbers(c: Ctx) -> list[Path]:
    """A caption shard whose captions are numbers, under a marker written before markers recorded
    their files (so only the reader can notice)."""
    shard = c.run / "captions" / "retrieval" / "000000.parquet"
    keys = pq.read_table(shard).column("key")
    pq.write_table(
        pa.table({"key": keys, "captions": [[1, 2]] * len(keys), "scores": [[0.5]] * len(keys)}), shard
    )
    edit_json("captions/retrieval/_done/000000.json", without("outputs"))(c)
    return [shard, c.run / "captions" / "retrieval" / "_done" / "000000.json"]


def copy_of_eval(c: Ctx) -> list[Path]:
    shutil.copytree(c.assets["eval"], c.folder / "eval")
    return []


def _append(path: Path, text: str) -> Path:
    with open(path, "a") as handle:
        handle.write(text)
    return path


def karpathy(entries: list) -> str:
    return json.dumps({"images": entries})


def _entry(**fields) -> dict:
    return {
        "filepath": "red",
        "filename": "0.jpg",
        "split": "test",
        "sentences": [{"raw": "a red"}],
        **fields,
    }


URLS_CSV_HEADER = "url,caption,label\n"
LATIN1_CSV = (URLS_CSV_HEADER + "http://127.0.0.1:9/0.jpg,caf\xe9 au lait,a\n").encode("latin-1")
LONG_LINE = "a red square\n" + "x" * 10_001 + "\n"

# manifest changes shared by several cases
PROBE_CAPTIONS = {"stages.caption.captions": "probe"}  # a caption set not made yet: it runs
PROBE_REALIGN = {"stages.realign.name": "probe", "stages.realign.source": "mcip"}  # the same


def probe_evaluate(section: str, value: dict) -> dict[str, Any]:
    """An evaluate run not made yet (`probe`) with one model and one benchmark section."""
    return {
        "stages.evaluate.name": "probe",
        "stages.evaluate.models": [{"name": "base", "checkpoint": "CHECKPOINT"}],
        **{f"stages.evaluate.{s}": DELETE for s in ("retrieval", "knn", "zero_shot", "text_to_image")},
        f"stages.evaluate.{section}": value,
    }


FOLDER_IMAGES = {"layout": "folder", "path": "ASSETS_EVAL"}
_URL_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("label", pa.string())])

# Issue 23: markers and bookkeeping files read back, and the paths `export` and `inspect` are given.
CAPTION_MARKER = "captions/retrieval/_done/000000.json"
MARKER_CASES = [
    case(
        "caption-marker-a-list",
        RUN_CAPTION,
        f"<run>/{CAPTION_MARKER}: marker is not a JSON object (a list); delete it",
        damage=json_file(CAPTION_MARKER, []),
    ),
    case(
        "caption-marker-a-list-seen-by-status",
        "status",
        f"<run>/{CAPTION_MARKER}: marker is not a JSON object (a list)",
        damage=json_file(CAPTION_MARKER, []),
    ),
    case(
        "caption-marker-a-number-seen-by-plan",
        "plan",
        f"<run>/{CAPTION_MARKER}: marker is not a JSON object (a int)",
        damage=json_file(CAPTION_MARKER, 7),
    ),
    case(
        "images-marker-of-another-unit",
        RUN_DOWNLOAD,
        "<run>/images/_done/000000.json: marker is for unit '000001', not '000000'",
        damage=copied("images/_done/000001.json", "images/_done/000000.json"),
    ),
    case(
        "images-marker-is-a-folder",
        RUN_DOWNLOAD,
        "<run>/images/_done/000000.json: marker cannot be read (Is a directory)",
        damage=as_folder("images/_done/000000.json"),
    ),
    case(
        "caption-marker-outputs-not-records",
        RUN_CAPTION,
        f"<run>/{CAPTION_MARKER}: marker field 'outputs.000000.parquet': input should be a valid dictionary",
        damage=edit_json(CAPTION_MARKER, with_value("outputs", {"000000.parquet": "abc"})),
    ),
    case(
        "caption-marker-outputs-outside-the-stage",
        RUN_CAPTION,
        ("marker field 'outputs'", "'../../../urls.parquet' is not a path inside the stage folder"),
        damage=edit_json(CAPTION_MARKER, with_value("outputs", {"../../../urls.parquet": {"bytes": 1}})),
    ),
    case(
        "finetune-marker-without-fingerprint",
        RUN_FINETUNE,
        "<run>/finetune/mcip/_done/final.json: marker field 'fingerprint': field required",
        damage=edit_json("finetune/mcip/_done/final.json", without("fingerprint")),
    ),
    case(
        "realign-marker-negative-size",
        RUN_REALIGN,
        "marker field 'outputs.final/model.pt.bytes': input should be greater than or equal to 0",
        damage=edit_json(
            "realign/mcip/_done/final.json",
            lambda m: {**m, "outputs": {**m["outputs"], "final/model.pt": {"bytes": -1}}},
        ),
    ),
    case(
        "evaluate-marker-settings-a-list",
        RUN_EVALUATE,
        "<run>/evaluate/eval/_done/ft.json: marker field 'settings': input should be a valid dictionary",
        damage=edit_json("evaluate/eval/_done/ft.json", with_value("settings", [])),
    ),
    case(
        "caption-bank-marker-a-list",
        RUN_CAPTION,
        ("caption bank: <run>/caption_bank/", "_done/000000.json: marker is not a JSON object (a list)"),
        damage=both(json_file("caption_bank/*/_done/000000.json", []), delete(CAPTION_MARKER)),
    ),
    case(
        "images-success-a-list",
        RUN_CAPTION,
        "<run>/images/_SUCCESS.json: damaged",
        damage=json_file("images/_SUCCESS.json", []),
    ),
    case(
        "images-labels-not-a-list",
        RUN_FINETUNE,
        "<run>/images/labels.json: damaged ('labels' is not a list of class names)",
        {"stages.finetune.name": "probe"},
        json_file("images/labels.json", {"column": "label", "labels": 5}),
    ),
]
LOCK = "logs/locks/download-rank0.lock"
BOOKKEEPING_CASES = [
    case(
        "lock-is-a-folder",
        RUN_CAPTION,
        "stage caption: <run>/logs/locks/caption-rank0.lock: cannot be used as a lock file (it is a folder",
        damage=as_folder("logs/locks/caption-rank0.lock"),
    ),
    case(
        "locks-folder-is-a-file",
        RUN_DOWNLOAD,
        f"<run>/{LOCK}: cannot be used as a lock file (<run>/logs/locks is a file, not a folder)",
        damage=as_file("logs/locks"),
    ),
    case(
        "lock-is-a-symlink-to-the-url-table",  # followed, the lock would truncate the URL table
        RUN_DOWNLOAD,
        f"<run>/{LOCK}: cannot be used as a lock file (it is a symbolic link",
        damage=symlink(f"run/{LOCK}", "../../../urls.parquet"),
    ),
    case(
        "runs-log-is-a-folder",
        "status",
        "<run>/logs/runs.jsonl: cannot be read (Is a directory)",
        damage=as_folder("logs/runs.jsonl"),
    ),
    case(
        "runs-log-is-a-folder-seen-by-run",
        RUN_CAPTION,
        "stage caption: cannot write <run>/logs/runs.jsonl (Is a directory)",
        damage=as_folder("logs/runs.jsonl"),
    ),
    case(
        "runs-log-line-a-list",
        "status",
        "<run>/logs/runs.jsonl: line 6 is not a run record (not a JSON object)",
        damage=lambda c: [_append(c.run / "logs" / "runs.jsonl", "[1, 2]\n")],
    ),
    case(
        "runs-log-line-without-rank",
        "status",
        "<run>/logs/runs.jsonl: line 6 is not a run record (field 'rank': field required)",
        damage=lambda c: [_append(c.run / "logs" / "runs.jsonl", '{"stage": "download", "started": 1}\n')],
    ),
    case(
        "slurm-jobs-a-list",
        "status",
        "<run>/slurm/jobs.json: not a record of submitted jobs (not a JSON object)",
        damage=json_file("slurm/jobs.json", []),
    ),
    case(
        "slurm-jobs-entry-a-number",
        "status",
        "<run>/slurm/jobs.json: not a record of submitted jobs (field 'download'",
        damage=json_file("slurm/jobs.json", {"download": 5}),
    ),
    case(
        "resolved-manifest-is-a-folder",
        RUN_DOWNLOAD,
        "run: cannot write <run>/manifest.resolved.yaml (Is a directory)",
        damage=as_folder("manifest.resolved.yaml"),
    ),
    case(
        "manifest-is-a-folder",
        "validate <folder>/mdir",
        "<folder>/mdir: cannot be read as a manifest (Is a directory)",
        damage=make_dirs("mdir"),
    ),
    case(
        "manifest-not-utf8",
        "validate <folder>/m8.yaml",
        "<folder>/m8.yaml: not UTF-8 text (byte 15)",
        damage=write("m8.yaml", "run: {root: caf\xe9}\n".encode("latin-1")),
    ),
    case(
        "manifest-too-large",
        "validate <folder>/big.yaml",
        "<folder>/big.yaml: larger than 1048576 bytes",
        damage=write("big.yaml", "#" * (2 << 20)),
    ),
    case(
        "manifest-root-is-a-file",
        VALIDATE,
        "run.root: <folder>/urls.parquet is a file, not a folder",
        {"run.root": "urls.parquet"},
    ),
]
EXPORT = "export --captions retrieval --to"
INSPECT = "inspect --captions retrieval"
EXPORT_CASES = [
    case(
        "export-to-the-images-folder",
        f"{EXPORT} <run>/images",
        "export --to <run>/images: is inside the run root <run>, which the pipeline owns",
    ),
    case("export-to-the-run-root", f"{EXPORT} <run>", "export --to <run>: is inside the run root <run>"),
    case(
        "export-to-a-link-into-the-run",
        f"{EXPORT} <folder>/link",
        "export --to <folder>/link: is inside the run root <run>",
        damage=symlink("link", "run/captions/retrieval"),
    ),
    case(
        "export-into-another-run-root",
        f"{EXPORT} <folder>/other/images",
        "export --to <folder>/other/images: is inside the run root <folder>/other",
        damage=write("other/manifest.resolved.yaml", "run: {root: .}\n"),
    ),
    case(
        "export-to-an-input-folder",
        f"{EXPORT} <folder>/eval/out",
        "export --to <folder>/eval/out: is inside <folder>/eval, which the manifest reads",
        {"stages.evaluate.knn.data.path": "eval"},
        copy_of_eval,
    ),
    case(
        "export-over-an-input-file",
        f"{EXPORT} <folder>/out",
        "export --to <folder>/out: would overwrite <folder>/out/sizes.json, which the manifest reads",
        {"stages.evaluate.zero_shot.class_names": "out/sizes.json"},
        write("out/sizes.json", json.dumps({"red": "r", "green": "g", "blue": "b"})),
    ),
    case(
        "export-to-a-file",
        f"{EXPORT} <folder>/urls.parquet",
        "<folder>/urls.parquet: is a file, not a folder",
    ),
    case(
        "export-below-a-file",
        f"{EXPORT} <folder>/urls.parquet/out",
        "export --to <folder>/urls.parquet/out: <folder>/urls.parquet is a file, not a folder",
    ),
    case(
        "export-shard-name-is-a-folder",
        f"{EXPORT} <folder>/out",
        "export: cannot write <folder>/out/000000.tar (Is a directory)",
        damage=make_dirs("out/000000.tar"),
    ),
    case(
        "export-captions-dotdot",
        "export --captions ../../images --to <folder>/out",
        "caption set '../../images' is not a plain folder name",
    ),
    case(
        "export-captions-not-made",
        "export --captions nope --to <folder>/out",
        "caption set 'nope' is not complete in <run>/captions/nope",
    ),
]
INSPECT_CASES = [
    case(
        "inspect-out-the-images-folder",
        f"{INSPECT} --out <run>/images",
        "inspect --out <run>/images: is inside the run root <run>, which the pipeline owns",
    ),
    case(
        "inspect-out-a-file", f"{INSPECT} --out <folder>/m.yaml", "inspect --out <folder>/m.yaml: is a file"
    ),
    case(
        "inspect-out-page-is-a-folder",
        f"{INSPECT} --out <folder>/page",
        "inspect: cannot write <folder>/page/index.html (Is a directory)",
        damage=make_dirs("page/index.html"),
    ),
    case(
        "inspect-out-over-an-input-file",
        f"{INSPECT} --out <folder>/out",
        "inspect --out <folder>/out: would overwrite <folder>/out/index.html, which the manifest reads",
        {
            "stages.evaluate.text_to_image": {
                "layout": "karpathy",
                "path": "out/index.html",
                "image_root": "ASSETS_EVAL",
            }
        },
        write("out/index.html", karpathy([_entry()])),
    ),
    case("inspect-captions-dotdot", "inspect --captions ..", "caption set '..' is not a plain folder name"),
    case(
        "inspect-samples-0", f"{INSPECT} --samples 0", "inspect: --samples must be between 1 and 5000, got 0"
    ),
    case("inspect-samples-too-many", f"{INSPECT} --samples 100000", "--samples must be between 1 and 5000"),
    case(
        "inspect-caption-parquet-edited-mtime-put-back",
        f"{INSPECT} --shards 000000",
        "caption unit 000000: <run>/captions/retrieval/000000.parquet content (sha256) differs",
        damage=edited_keeping_mtime("captions/retrieval/000000.parquet"),
    ),
    case(
        "inspect-half-cut-tar",
        "inspect --shards 000000",
        "download unit 000000: <run>/images/000000.tar size",
        damage=cut("images/000000.tar"),
    ),
    case(
        "inspect-half-cut-tar-under-captions",
        f"{INSPECT} --shards 000001",
        ("download unit 000001: <run>/images/000001.tar size", "--repair` redoes it"),
        damage=cut("images/000001.tar"),
    ),
    case(
        "inspect-marker-cut",
        f"{INSPECT} --shards 000000",
        f"<run>/{CAPTION_MARKER}: marker is not valid JSON",
        damage=cut(CAPTION_MARKER),
    ),
    case(
        "inspect-marker-a-list",
        "inspect --shards 000001",
        "<run>/images/_done/000001.json: marker is not a JSON object (a list)",
        damage=json_file("images/_done/000001.json", []),
    ),
    case(
        "inspect-caption-shard-of-numbers",
        f"{INSPECT} --shards 000000",
        "<run>/captions/retrieval/000000.parquet: not a caption shard (column 'captions' is list<",
        damage=legacy_caption_shard_of_numbers,
    ),
    case(
        "inspect-labels-not-a-list",
        "inspect",
        "<run>/images/labels.json: damaged ('labels' is not a list of class names)",
        damage=json_file("images/labels.json", {"column": "label", "labels": {"a": 1}}),
    ),
]

CASES = [
    # -- the manifest itself ------------------------------------------------------------------------
    case("manifest-unknown-stage", VALIDATE, "stages.sing: unknown key", {"stages.sing": {"x": 1}}),
    case("manifest-unknown-top-key", VALIDATE, "runs: unknown key", {"runs": {"root": "x"}}),
    case("manifest-missing-root", VALIDATE, "run.root: required key is missing", {"run.root": DELETE}),
    case("manifest-seed-not-int", VALIDATE, ("run.seed", "'abc'"), {"run.seed": "abc"}),
    case("manifest-not-yaml", VALIDATE, ("<folder>/m.yaml", "not valid YAML"), text="run: [root\n"),
    case("manifest-a-list", VALIDATE, ("<folder>/m.yaml", "a manifest is a mapping"), text="- run\n"),
    case("manifest-missing", "validate <folder>/gone.yaml", "<folder>/gone.yaml: manifest not found"),
    # -- the environment ----------------------------------------------------------------------------
    case(
        "env-rank-abc", VALIDATE, "RANK='abc' is not a whole number", env={"RANK": "abc", "WORLD_SIZE": "2"}
    ),
    case(
        "env-rank-3-of-2",
        VALIDATE,
        "RANK/WORLD_SIZE: rank 3 is not in [0, 2)",
        env={"RANK": "3", "WORLD_SIZE": "2"},
    ),
    case("env-world-0", VALIDATE, "rank 0 is not in [0, 0)", env={"RANK": "0", "WORLD_SIZE": "0"}),
    case(
        "env-slurm-procid-x",
        VALIDATE,
        "SLURM_PROCID='x' is not a whole number",
        env={"SLURM_PROCID": "x", "SLURM_NTASKS": "2"},
    ),
    case(
        "env-slurm-procid-5-of-2",
        VALIDATE,
        "SLURM_PROCID/SLURM_NTASKS: rank 5 is not in [0, 2)",
        env={"SLURM_PROCID": "5", "SLURM_NTASKS": "2"},
    ),
    # -- download: the URL table and the settings ---------------------------------------------------
    case(
        "download-csv-not-utf8",
        RUN_DOWNLOAD,
        "<folder>/urls.csv",
        {"stages.download.url_list": "urls.csv"},
        write("urls.csv", LATIN1_CSV),
    ),
    case(
        "download-csv-header-only",
        RUN_DOWNLOAD,
        "<folder>/urls.csv: the URL table has no rows",
        {"stages.download.url_list": "urls.csv"},
        write("urls.csv", URLS_CSV_HEADER),
    ),
    case(
        "download-parquet-no-rows",
        RUN_DOWNLOAD,
        "<folder>/empty.parquet: the URL table has no rows",
        {"stages.download.url_list": "empty.parquet"},
        write(
            "empty.parquet",
            lambda p: pq.write_table(
                pa.table({"url": [], "caption": [], "label": []}, schema=_URL_SCHEMA), p
            ),
        ),
    ),
    case(
        "download-url-column-is-a-list",
        RUN_DOWNLOAD,
        ("<folder>/lists.parquet", "'url'"),
        {"stages.download.url_list": "lists.parquet"},
        write(
            "lists.parquet",
            parquet({"url": [["http://127.0.0.1:9/0.jpg"]], "caption": ["c"], "label": ["a"]}),
        ),
    ),
    case(
        "download-nan-labels",
        RUN_DOWNLOAD,
        "<folder>/nan.parquet: column 'label' is empty in row 1",
        {"stages.download.url_list": "nan.parquet"},
        write(
            "nan.parquet",
            parquet(
                {"url": ["http://127.0.0.1:9/0.jpg"] * 2, "caption": ["a", "b"], "label": [0.0, float("nan")]}
            ),
        ),
    ),
    case(
        "download-url-list-missing",
        VALIDATE,
        ("stages.download.url_list: URL table not found", "<folder>/gone.parquet"),
        {"stages.download.url_list": "gone.parquet"},
    ),
    case(
        "download-url-col-missing",
        VALIDATE,
        "urls.parquet: no column 'link'",
        {"stages.download.url_col": "link"},
    ),
    case(
        "download-label-col-missing",
        VALIDATE,
        "urls.parquet: no column 'class'",
        {"stages.download.label_col": "class"},
    ),
    case(
        "download-caption-col-missing",
        VALIDATE,
        "urls.parquet: no column 'text'",
        {"stages.download.caption_col": "text"},
    ),
    case(
        "download-unknown-suffix",
        VALIDATE,
        ("<folder>/urls.xlsx", "'.xlsx'", "input_format"),
        {"stages.download.url_list": "urls.xlsx"},
        write("urls.xlsx", b"PK\x03\x04"),
    ),
    case(
        "download-input-format-unknown",
        VALIDATE,
        ("stages.download.input_format", "'xml'"),
        {"stages.download.input_format": "xml"},
    ),
    case(
        "download-parquet-garbage",
        VALIDATE,
        "<folder>/bad.parquet: not a readable parquet table",
        {"stages.download.url_list": "bad.parquet"},
        write("bad.parquet", b"PAR1 but not really a parquet file"),
    ),
    case(
        "download-jsonl-garbage",
        VALIDATE,
        "<folder>/urls.jsonl: not a readable jsonl table",
        {"stages.download.url_list": "urls.jsonl"},
        write("urls.jsonl", '{"url": "http://127.0.0.1:9/0.jpg"\n{oops\n'),
    ),
    case(
        "download-samples-per-shard-0",
        VALIDATE,
        "stages.download.samples_per_shard: must be > 0, got 0",
        {"stages.download.samples_per_shard": 0},
    ),
    case(
        "download-samples-per-shard-text",
        VALIDATE,
        ("stages.download.samples_per_shard: input should be a valid integer", "'many'"),
        {"stages.download.samples_per_shard": "many"},
    ),
    case(
        "download-image-size-negative",
        VALIDATE,
        "stages.download.image_size: must be > 0, got -32",
        {"stages.download.image_size": -32},
    ),
    case(
        "download-encode-quality-101",
        VALIDATE,
        "stages.download.encode_quality: must be <= 100, got 101",
        {"stages.download.encode_quality": 101},
    ),
    case(
        "download-processes-0",
        VALIDATE,
        "stages.download.processes: must be > 0, got 0",
        {"stages.download.processes": 0},
    ),
    case(
        "download-max-failed-fraction-1.5",
        VALIDATE,
        "stages.download.max_failed_fraction: must be <= 1.0, got 1.5",
        {"stages.download.max_failed_fraction": 1.5},
    ),
    case(
        "download-unknown-key",
        VALIDATE,
        "stages.download.captons_per_image: unknown key",
        {"stages.download.captons_per_image": 5},
    ),
    # -- download: its output damaged ---------------------------------------------------------------
    case(
        "images-tar-cut-mid-member",
        RUN_DOWNLOAD,
        ("download unit 000000: <run>/images/000000.tar size", "--repair"),
        damage=cut("images/000000.tar", 0.3),
    ),
    case(
        "images-tar-deleted",
        RUN_DOWNLOAD,
        "download unit 000000: <run>/images/000000.tar is missing",
        damage=delete("images/000000.tar"),
    ),
    case(
        "images-tar-replaced-by-another",
        RUN_DOWNLOAD,
        "download unit 000000: <run>/images/000000.tar holds other keys than its marker records",
        damage=replace_tar,
    ),
    case(
        "images-parquet-deleted",
        RUN_DOWNLOAD,
        "download unit 000001: <run>/images/000001.parquet is missing",
        damage=delete("images/000001.parquet"),
    ),
    case(
        "images-marker-cut",
        RUN_DOWNLOAD,
        "<run>/images/_done/000000.json: marker is not valid JSON",
        damage=cut("images/_done/000000.json"),
    ),
    case(
        "images-success-cut",
        RUN_CAPTION,
        "<run>/images/_SUCCESS.json: damaged",
        damage=cut("images/_SUCCESS.json"),
    ),
    case(
        "images-tar-deleted-seen-by-caption",
        RUN_CAPTION,
        "download unit 000001: <run>/images/000001.tar is missing",
        damage=delete("images/000001.tar"),
    ),
    case(
        "images-labels-cut",
        RUN_FINETUNE,
        "<run>/images/labels.json: damaged",
        {"stages.finetune.name": "probe"},
        cut("images/labels.json"),
    ),
    case("runs-log-line-cut", "status", "<run>/logs/runs.jsonl", damage=cut_last_line("logs/runs.jsonl")),
    # -- caption: the bank and the settings --------------------------------------------------------
    case(
        "caption-bank-not-utf8",
        RUN_CAPTION,
        "<folder>/bank.txt",
        {**PROBE_CAPTIONS, "stages.caption.retrieval.bank": "bank.txt"},
        write("bank.txt", "a red square\ncaf\xe9 au lait\n".encode("latin-1")),
    ),
    case(
        "caption-bank-column-of-numbers",
        RUN_CAPTION,
        ("<folder>/bank.parquet", "'caption'"),
        {**PROBE_CAPTIONS, "stages.caption.retrieval.bank": "bank.parquet"},
        write("bank.parquet", parquet({"caption": [1, 2, 3]})),
    ),
    case(
        "caption-bank-line-too-long",
        RUN_CAPTION,
        "caption bank <folder>/bank.txt: line 2 is longer than 10000 characters",
        {**PROBE_CAPTIONS, "stages.caption.retrieval.bank": "bank.txt"},
        write("bank.txt", LONG_LINE),
    ),
    case(
        "caption-bank-empty",
        RUN_CAPTION,
        "caption bank is empty: <folder>/bank.txt",
        {**PROBE_CAPTIONS, "stages.caption.retrieval.bank": "bank.txt"},
        write("bank.txt", "\n  \n\n"),
    ),
    case(
        "caption-bank-col-missing",
        RUN_CAPTION,
        "<folder>/bank.parquet: no column 'caption'",
        {**PROBE_CAPTIONS, "stages.caption.retrieval.bank": "bank.parquet"},
        write("bank.parquet", parquet({"text": ["a red square"]})),
    ),
    case(
        "caption-bank-missing",
        VALIDATE,
        "caption bank not found: <folder>/nobank.txt",
        {"stages.caption.retrieval.bank": "nobank.txt"},
    ),
    case(
        "caption-backend-unknown",
        VALIDATE,
        ("stages.caption.backend", "'blip3'"),
        {"stages.caption.backend": "blip3"},
    ),
    case(
        "caption-retrieval-section-with-alt-text",
        VALIDATE,
        "retrieval: not used by backend 'alt_text'",
        {
            "stages.caption.backend": "alt_text",
            "stages.caption.model": DELETE,
            "stages.caption.captions_per_image": DELETE,
        },
    ),
    case(
        "caption-generation-section-with-retrieval",
        VALIDATE,
        "generation: not used by backend 'retrieval'",
        {"stages.caption.generation": {"decoding": "beam"}},
    ),
    case(
        "caption-set-dotdot", VALIDATE, ("stages.caption.captions", "'..'"), {"stages.caption.captions": ".."}
    ),
    case(
        "caption-set-slash",
        VALIDATE,
        ("stages.caption.captions", "'a/b'"),
        {"stages.caption.captions": "a/b"},
    ),
    case(
        "caption-set-alt-reserved",
        VALIDATE,
        "captions: 'alt' is reserved",
        {"stages.caption.captions": "alt"},
    ),
    case(
        "caption-threshold-above-1",
        VALIDATE,
        "stages.caption.retrieval.threshold: must be <= 1.0, got 1.5",
        {"stages.caption.retrieval.threshold": 1.5},
    ),
    case(
        "caption-threshold-below-minus-1",
        VALIDATE,
        "stages.caption.retrieval.threshold: must be >= -1.0, got -2",
        {"stages.caption.retrieval.threshold": -2},
    ),
    case(
        "caption-batch-size-0",
        VALIDATE,
        "stages.caption.batch_size: must be > 0, got 0",
        {"stages.caption.batch_size": 0},
    ),
    case(
        "caption-batch-size-negative",
        VALIDATE,
        "stages.caption.batch_size: must be > 0, got -4",
        {"stages.caption.batch_size": -4},
    ),
    case(
        "caption-k-0",
        VALIDATE,
        "stages.caption.captions_per_image: must be > 0, got 0",
        {"stages.caption.captions_per_image": 0},
    ),
    case(
        "caption-num-workers-negative",
        VALIDATE,
        "stages.caption.num_workers: must be >= 0, got -1",
        {"stages.caption.num_workers": -1},
    ),
    case(
        "caption-device-gpu",
        VALIDATE,
        "stages.caption.device: device must be cpu, cuda, cuda:N or mps, got 'gpu'",
        {"stages.caption.device": "gpu"},
    ),
    case(
        "caption-pretrained-missing",
        VALIDATE,
        "caption model not found: /no/such.pt",
        {"stages.caption.retrieval.pretrained": "/no/such.pt"},
    ),
    case(
        "caption-arch-unknown",
        VALIDATE,
        "caption: unknown open_clip architecture 'ViT-Nope'",
        {"stages.caption.model": "ViT-Nope"},
    ),
    case(
        "caption-index-flat",
        VALIDATE,
        "index 'flat' was replaced",
        {"stages.caption.retrieval.index": "flat"},
    ),
    case(
        "caption-ivf-key-with-exact-index",
        VALIDATE,
        "ivf_nlist: only used with index 'ivfpq'",
        {"stages.caption.retrieval.ivf_nlist": 4},
    ),
    case(
        "caption-unknown-key",
        VALIDATE,
        "stages.caption.retrieval.treshold: unknown key",
        {"stages.caption.retrieval.treshold": 0.2},
    ),
    # -- caption: its output and caches damaged ----------------------------------------------------
    case(
        "caption-parquet-deleted",
        RUN_CAPTION,
        "caption unit 000001: <run>/captions/retrieval/000001.parquet is missing",
        damage=delete("captions/retrieval/000001.parquet"),
    ),
    case(
        "caption-parquet-garbage",
        RUN_CAPTION,
        "caption unit 000001: <run>/captions/retrieval/000001.parquet is not a readable parquet table",
        damage=garbage_parquet("captions/retrieval/000001.parquet"),
    ),
    case(
        "caption-parquet-deleted-seen-by-finetune",
        RUN_FINETUNE,
        "caption unit 000000: <run>/captions/retrieval/000000.parquet is missing",
        damage=delete("captions/retrieval/000000.parquet"),
    ),
    case(
        "caption-marker-cut",
        RUN_CAPTION,
        "<run>/captions/retrieval/_done/000000.json: marker is not valid JSON",
        damage=cut("captions/retrieval/_done/000000.json"),
    ),
    case(
        "caption-success-cut",
        RUN_FINETUNE,
        "<run>/captions/retrieval/_SUCCESS.json: damaged",
        damage=cut("captions/retrieval/_SUCCESS.json"),
    ),
    case(
        "caption-bank-texts-cut",
        RUN_CAPTION,
        "texts.arrow",
        damage=both(cut("caption_bank/*/texts.arrow"), delete("captions/retrieval/_done/000000.json")),
    ),
    # -- finetune ----------------------------------------------------------------------------------
    case(
        "finetune-deepspeed-not-json",
        VALIDATE,
        "finetune: DeepSpeed config <folder>/ds.json is not JSON",
        {"stages.finetune.deepspeed": "ds.json"},
        write("ds.json", "{not json"),
    ),
    case(
        "finetune-deepspeed-a-list",
        VALIDATE,
        "finetune: DeepSpeed config <folder>/ds.json is not a JSON object",
        {"stages.finetune.deepspeed": "ds.json"},
        write("ds.json", "[1, 2]"),
    ),
    case(
        "finetune-deepspeed-missing",
        VALIDATE,
        "finetune: DeepSpeed config not found: <folder>/gone.json",
        {"stages.finetune.deepspeed": "gone.json"},
    ),
    case(
        "finetune-betas-1.5",
        VALIDATE,
        "stages.finetune.betas: betas must be in [0, 1), got [1.5, 0.999]",
        {"stages.finetune.betas": [1.5, 0.999]},
    ),
    case(
        "finetune-device-gpu",
        VALIDATE,
        "stages.finetune.device: device must be cpu, cuda, cuda:N or mps, got 'gpu'",
        {"stages.finetune.device": "gpu"},
    ),
    case(
        "finetune-arch-unknown",
        VALIDATE,
        "finetune: unknown open_clip architecture 'ViT-Nope'",
        {"stages.finetune.model": "ViT-Nope"},
    ),
    case(
        "finetune-pretrained-tag-unknown",
        VALIDATE,
        "finetune: open_clip has no pretrained tag 'nope' for mcip-tiny-vit",
        {"stages.finetune.pretrained": "nope"},
    ),
    case(
        "finetune-checkpoint-missing",
        VALIDATE,
        "finetune: checkpoint not found: /no/such.pt",
        {"stages.finetune.pretrained": "/no/such.pt"},
    ),
    case(
        "finetune-config-dir-missing",
        VALIDATE,
        "finetune: open_clip config folder not found: <folder>/no-configs",
        {"stages.finetune.config_dir": "no-configs"},
    ),
    case("finetune-lr-0", VALIDATE, "stages.finetune.lr: must be > 0.0, got 0", {"stages.finetune.lr": 0}),
    case(
        "finetune-lr-negative",
        VALIDATE,
        "stages.finetune.lr: must be > 0.0, got -0.001",
        {"stages.finetune.lr": -0.001},
    ),
    case(
        "finetune-epochs-0",
        VALIDATE,
        "stages.finetune.epochs: must be > 0, got 0",
        {"stages.finetune.epochs": 0},
    ),
    case(
        "finetune-batch-size-negative",
        VALIDATE,
        "stages.finetune.batch_size: must be > 0, got -2",
        {"stages.finetune.batch_size": -2},
    ),
    case(
        "finetune-loss-unknown",
        VALIDATE,
        ("stages.finetune.loss", "'triplet'"),
        {"stages.finetune.loss": "triplet"},
    ),
    case(
        "finetune-mcip-without-captions",
        VALIDATE,
        "loss 'mcip' needs `captions`",
        {"stages.finetune.captions": DELETE},
    ),
    case("finetune-name-dotdot", VALIDATE, ("stages.finetune.name", "'..'"), {"stages.finetune.name": ".."}),
    case(
        "finetune-captions-set-not-made",
        RUN_FINETUNE,
        "caption set 'nope' is not complete",
        {"stages.finetune.captions": "nope"},
    ),
    # -- finetune: its output damaged --------------------------------------------------------------
    case(
        "finetune-model-pt-cut",
        RUN_FINETUNE,
        "<run>/finetune/mcip/final/model.pt",
        damage=cut("finetune/mcip/final/model.pt"),
    ),
    case(
        "finetune-model-pt-cut-seen-by-realign",
        RUN_REALIGN,
        "<run>/finetune/mcip/final/model.pt",
        damage=cut("finetune/mcip/final/model.pt"),
    ),
    case(
        "finetune-model-json-missing",
        RUN_FINETUNE,
        "<run>/finetune/mcip/final/model.json",
        damage=delete("finetune/mcip/final/model.json"),
    ),
    case(
        "finetune-model-json-missing-seen-by-realign",
        RUN_REALIGN,
        "<run>/finetune/mcip/final/model.json",
        PROBE_REALIGN,
        delete("finetune/mcip/final/model.json"),
    ),
    case(
        "finetune-marker-cut",
        RUN_FINETUNE,
        "<run>/finetune/mcip/_done/final.json: marker is not valid JSON",
        damage=cut("finetune/mcip/_done/final.json"),
    ),
    case(
        "finetune-success-cut",
        RUN_REALIGN,
        "<run>/finetune/mcip/_SUCCESS.json: damaged",
        damage=cut("finetune/mcip/_SUCCESS.json"),
    ),
    # -- realign -----------------------------------------------------------------------------------
    case(
        "realign-unlocked-layers-99",
        VALIDATE,
        "realign: unlocked_layers 99 is more than the text tower's 2 blocks",
        {
            "stages.realign.unlocked_layers": 99,
            "stages.realign.model": "ARCH",
            "stages.realign.config_dir": "CONFIGS",
        },
    ),
    case(
        "realign-unlocked-layers-99-from-the-finetune-run",
        RUN_REALIGN,
        ("realign: unlocked_layers", "got 99"),
        {"stages.realign.unlocked_layers": 99, **PROBE_REALIGN},
    ),
    case(
        "realign-device-gpu",
        VALIDATE,
        "stages.realign.device: device must be cpu, cuda, cuda:N or mps, got 'gpu'",
        {"stages.realign.device": "gpu"},
    ),
    case(
        "realign-betas-1.5",
        VALIDATE,
        "stages.realign.betas: betas must be in [0, 1), got [1.5, 0.999]",
        {"stages.realign.betas": [1.5, 0.999]},
    ),
    case("realign-lr-0", VALIDATE, "stages.realign.lr: must be > 0.0, got 0", {"stages.realign.lr": 0}),
    case(
        "realign-batch-size-0",
        VALIDATE,
        "stages.realign.batch_size: must be > 0, got 0",
        {"stages.realign.batch_size": 0},
    ),
    case(
        "realign-epochs-negative",
        VALIDATE,
        "stages.realign.epochs: must be > 0, got -1",
        {"stages.realign.epochs": -1},
    ),
    case(
        "realign-unlocked-layers-negative",
        VALIDATE,
        "stages.realign.unlocked_layers: must be >= 0, got -1",
        {"stages.realign.unlocked_layers": -1},
    ),
    case(
        "realign-captions-slash",
        VALIDATE,
        ("stages.realign.captions", "'../x'"),
        {"stages.realign.captions": "../x"},
    ),
    case(
        "realign-loss-unknown",
        VALIDATE,
        ("stages.realign.loss", "'triplet'"),
        {"stages.realign.loss": "triplet"},
    ),
    case(
        "realign-deepspeed-not-json",
        VALIDATE,
        "realign: DeepSpeed config <folder>/ds.json is not JSON",
        {"stages.realign.deepspeed": "ds.json"},
        write("ds.json", "{"),
    ),
    case(
        "realign-before-its-finetune-is-done",
        RUN_REALIGN,
        "finetune 'later' is not complete",
        {"stages.realign.source": "later"},
    ),
    case(
        "realign-captions-set-not-made",
        RUN_REALIGN,
        "caption set 'nope' is not complete",
        {"stages.realign.captions": "nope"},
    ),
    case(
        "realign-embeddings-cut",
        RUN_REALIGN,
        "<run>/embeddings/mcip/000000.npy",
        damage=both(cut("embeddings/mcip/000000.npy"), delete("realign/mcip/_done/final.json")),
    ),
    case(
        "realign-embeddings-marker-cut",
        RUN_REALIGN,
        "<run>/embeddings/mcip/_done/000001.json: marker is not valid JSON",
        damage=both(cut("embeddings/mcip/_done/000001.json"), delete("realign/mcip/_done/final.json")),
    ),
    case(
        "realign-marker-cut",
        RUN_REALIGN,
        "<run>/realign/mcip/_done/final.json: marker is not valid JSON",
        damage=cut("realign/mcip/_done/final.json"),
    ),
    # -- evaluate: settings ------------------------------------------------------------------------
    case(
        "evaluate-template-two-placeholders",
        VALIDATE,
        "template 'a {} {}' must contain '{}' once",
        {"stages.evaluate.zero_shot.templates": ["a {} {}"]},
    ),
    case("evaluate-models-empty", VALIDATE, ("stages.evaluate.models", "[]"), {"stages.evaluate.models": []}),
    case(
        "evaluate-model-names-twice",
        VALIDATE,
        "model names must be unique, got ['base', 'base']",
        {"stages.evaluate.models": [{"name": "base"}, {"name": "base"}]},
    ),
    case(
        "evaluate-nothing-to-evaluate",
        VALIDATE,
        "nothing to evaluate",
        {f"stages.evaluate.{s}": DELETE for s in ("retrieval", "knn", "zero_shot", "text_to_image")},
    ),
    case(
        "evaluate-grid-unknown",
        VALIDATE,
        "grid 'nope' is not a retrieval dataset",
        {"stages.evaluate.grid": "nope"},
    ),
    case(
        "evaluate-model-checkpoint-and-stage",
        VALIDATE,
        "model 'x': give `checkpoint` or `stage`, not both",
        {"stages.evaluate.models": [{"name": "x", "checkpoint": "/no.pt", "stage": "finetune/mcip"}]},
    ),
    case(
        "evaluate-model-stage-unknown",
        VALIDATE,
        ("stages.evaluate.models.0.stage", "'train/mcip'"),
        {"stages.evaluate.models": [{"name": "x", "stage": "train/mcip"}]},
    ),
    case(
        "evaluate-model-name-dot",
        VALIDATE,
        ("stages.evaluate.models.0.name", "'.hidden'"),
        {"stages.evaluate.models": [{"name": ".hidden"}]},
    ),
    case(
        "evaluate-knn-k-0",
        VALIDATE,
        "stages.evaluate.knn.k: must be > 0, got 0",
        {"stages.evaluate.knn.k": 0},
    ),
    case(
        "evaluate-device-gpu",
        VALIDATE,
        "stages.evaluate.device: device must be cpu, cuda, cuda:N or mps, got 'gpu'",
        {"stages.evaluate.device": "gpu"},
    ),
    case(
        "evaluate-batch-size-0",
        VALIDATE,
        "stages.evaluate.batch_size: must be > 0, got 0",
        {"stages.evaluate.batch_size": 0},
    ),
    case(
        "evaluate-layout-unknown",
        VALIDATE,
        ("stages.evaluate.knn.data.layout", "'imagenet'"),
        {"stages.evaluate.knn.data.layout": "imagenet"},
    ),
    case(
        "evaluate-class-names-missing",
        VALIDATE,
        "evaluate: class names file not found: <folder>/names.json",
        {"stages.evaluate.zero_shot.class_names": "names.json"},
    ),
    case(
        "evaluate-checkpoint-missing",
        VALIDATE,
        "evaluate: model 'base': checkpoint not found: /no/such.pt",
        {"stages.evaluate.models": [{"name": "base", "checkpoint": "/no/such.pt"}]},
    ),
    # -- evaluate: inputs --------------------------------------------------------------------------
    case(
        "evaluate-folder-missing",
        RUN_EVALUATE,
        "image folder not found: <folder>/nowhere",
        {"stages.evaluate.knn.data.path": "nowhere"},
    ),
    case(
        "evaluate-folder-missing-at-validate",
        VALIDATE,
        "<folder>/nowhere",
        {"stages.evaluate.knn.data.path": "nowhere"},
    ),
    case(
        "evaluate-gpr1200-folder-missing",
        RUN_EVALUATE,
        "GPR1200 folder not found: <folder>/nowhere",
        {"stages.evaluate.retrieval": {"world": {"layout": "gpr1200", "path": "nowhere"}}},
    ),
    case(
        "evaluate-stage-model-not-made",
        RUN_EVALUATE,
        "the finetune/later stage is not complete",
        {"stages.evaluate.models": [{"name": "ft", "stage": "finetune/later"}]},
    ),
    case(
        "evaluate-class-names-cut",
        RUN_EVALUATE,
        "<folder>/names.json: class names are not valid JSON",
        probe_evaluate("zero_shot", {"data": FOLDER_IMAGES, "class_names": "names.json"}),
        write("names.json", '{"red": "red thing", "gre'),
    ),
    case(
        "evaluate-class-names-fewer-than-classes",
        RUN_EVALUATE,
        ("<folder>/names.json: no class name for label(s)", "blue"),
        probe_evaluate("zero_shot", {"data": FOLDER_IMAGES, "class_names": "names.json"}),
        write("names.json", json.dumps({"red": "red thing", "green": "green thing"})),
    ),
    case(
        "evaluate-karpathy-entry-without-filename",
        RUN_EVALUATE,
        ("<folder>/captions.json: image entry 1 has no 'filename'",),
        probe_evaluate(
            "text_to_image", {"layout": "karpathy", "path": "captions.json", "image_root": "ASSETS_EVAL"}
        ),
        write("captions.json", karpathy([_entry(), {"filepath": "red", "sentences": [{"raw": "a red"}]}])),
    ),
    case(
        "evaluate-karpathy-sentence-without-raw",
        RUN_EVALUATE,
        ("<folder>/captions.json: image entry 0 has no 'raw'",),
        probe_evaluate(
            "text_to_image", {"layout": "karpathy", "path": "captions.json", "image_root": "ASSETS_EVAL"}
        ),
        write("captions.json", karpathy([_entry(sentences=[{"text": "a red"}])])),
    ),
    case(
        "evaluate-karpathy-not-json",
        RUN_EVALUATE,
        "<folder>/captions.json: not a Karpathy-split json",
        probe_evaluate(
            "text_to_image", {"layout": "karpathy", "path": "captions.json", "image_root": "ASSETS_EVAL"}
        ),
        write("captions.json", '{"images": [{"filepath": "red"'),
    ),
    case(
        "evaluate-karpathy-image-missing",
        RUN_EVALUATE,
        "<folder>/captions.json: image ASSETS_EVAL/red/9.jpg listed in the caption file does not exist",
        probe_evaluate(
            "text_to_image", {"layout": "karpathy", "path": "captions.json", "image_root": "ASSETS_EVAL"}
        ),
        write("captions.json", karpathy([_entry(filename="9.jpg")])),
    ),
    case(
        "evaluate-undecodable-image",
        RUN_EVALUATE,
        "<folder>/eval/red/1.jpg",
        probe_evaluate("knn", {"data": {"layout": "folder", "path": "eval"}, "k": 3}),
        eval_copy_with_bad_image,
    ),
    case(
        "evaluate-shards-labels-cut",
        RUN_EVALUATE,
        "<run>/images/labels.json: damaged",
        probe_evaluate("knn", {"data": {"layout": "shards"}, "k": 3}),
        cut("images/labels.json"),
    ),
    # -- evaluate: its output and caches damaged ---------------------------------------------------
    case(
        "evaluate-metrics-deleted",
        RUN_EVALUATE,
        "evaluate unit ft: <run>/evaluate/eval/metrics/ft.json is missing",
        damage=delete("evaluate/eval/metrics/ft.json"),
    ),
    case(
        "evaluate-marker-cut",
        RUN_EVALUATE,
        "<run>/evaluate/eval/_done/ft.json: marker is not valid JSON",
        damage=cut("evaluate/eval/_done/ft.json"),
    ),
    case(
        "evaluate-realign-model-pt-cut",
        RUN_EVALUATE,
        "<run>/realign/mcip/final/model.pt",
        damage=cut("realign/mcip/final/model.pt"),
    ),
    *MARKER_CASES,
    *BOOKKEEPING_CASES,
    *EXPORT_CASES,
    *INSPECT_CASES,
]


# ---- the test --------------------------------------------------------------------------------------


def _fill(value: Any, folder: Path, assets: dict[str, Any]) -> Any:
    """Manifest values with their placeholders (ARCH, CONFIGS, CHECKPOINT, ASSETS_EVAL) filled in."""
    if isinstance(value, dict):
        return {k: _fill(v, folder, assets) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, folder, assets) for v in value]
    if isinstance(value, str):
        return {
            "ARCH": assets["arch"],
            "CONFIGS": str(assets["config_dir"]),
            "CHECKPOINT": str(assets["checkpoint"]),
        }.get(value, value.replace("ASSETS_EVAL", str(assets["eval"])))
    return value


def _expected(text: str, folder: Path, assets: dict[str, Any]) -> str:
    return (
        text.replace("<run>", str(folder / "run"))
        .replace("<folder>", str(folder))
        .replace("ASSETS_EVAL", str(assets["eval"]))
    )


@pytest.fixture
def copy_of_made(made, tmp_path, monkeypatch) -> Ctx:
    monkeypatch.setenv("MCIP_CACHE_DIR", str(made["cache"]))
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    folder = copy_made(made["made"], tmp_path / "copy")
    return Ctx(folder, folder / "run", made["assets"])


def _call(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = cli(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    """The one `error:` line, which is also the last line on stderr."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert err.rstrip("\n").splitlines()[-1] == errors[0] and err.endswith("\n"), err[-3000:]
    return errors[0]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(made, copy_of_made, capsys, monkeypatch, bad: Case):
    c = copy_of_made
    manifest = c.folder / "m.yaml"
    if bad.manifest_text is not None:
        manifest.write_text(bad.manifest_text)
    else:
        write_manifest(c.folder, changed(made["data"], _fill(bad.change, c.folder, c.assets)))
    skip = bad.damage(c) if bad.damage else []
    before = digests(c.run, tuple(skip))
    for name, value in bad.env.items():
        monkeypatch.setenv(name, _expected(value, c.folder, c.assets))

    command = [_expected(arg, c.folder, c.assets) for arg in bad.command]
    argv = (
        command
        if len(command) > 1 and command[1].startswith("/")
        else [command[0], str(manifest), *command[1:]]
    )
    code, out, err = _call(argv, capsys)

    assert code == 2, f"exit code {code}; stdout: {out[-1500:]}; stderr: {err[-3000:]}"
    line = _error_line(err)
    for text in bad.expect:
        assert _expected(text, c.folder, c.assets) in line, line
    after = digests(c.run, tuple(skip))
    assert {p: d for p, d in after.items() if p in before} == before, "a finished output changed"
    assert set(before) <= set(after), f"files removed: {sorted(set(before) - set(after))}"
    assert not [p for p in set(after) - set(before) if p.endswith("_SUCCESS.json")]


def test_the_copy_is_complete_and_a_rerun_changes_nothing(made, copy_of_made, capsys):
    """The baseline every case starts from: each stage of the copy is done, a rerun writes nothing."""
    c = copy_of_made
    before = digests(c.run, (c.run / "manifest.resolved.yaml",))
    code, out, err = _call(["status", str(c.folder / "m.yaml")], capsys)
    assert code == 0 and out.count("[complete]") == 5, out + err
    code, out, err = _call(["run", str(c.folder / "m.yaml")], capsys)
    assert code == 0, err[-3000:]
    assert digests(c.run, (c.run / "manifest.resolved.yaml",)) == before


def test_realign_before_its_finetune_is_done_is_waiting(made, copy_of_made, capsys):
    """`status` and `plan` say "waiting" (exit 0); `run` of that stage is an error (exit 2)."""
    c = copy_of_made
    manifest = write_manifest(c.folder, changed(made["data"], {"stages.realign.source": "later"}))
    for command in ("status", "plan"):
        code, out, err = _call([command, str(manifest)], capsys)
        assert code == 0, err
        assert f"realign: waiting (finetune 'later' is not complete in {c.run / 'finetune' / 'later'}" in out
    code, out, err = _call(["run", str(manifest), "--stage", "realign"], capsys)
    assert code == 2 and "finetune 'later' is not complete" in _error_line(err) and "run it first" in err


def test_a_cut_caption_bank_chunk_is_embedded_again(made, copy_of_made, capsys):
    """A damaged cache is recomputed, not trusted: the chunk's owner embeds it again (one warning
    naming it), and the redone caption shard equals the one made from the intact bank."""
    c = copy_of_made
    (chunk,) = c.run.glob("caption_bank/*/000000.npy")
    original = chunk.read_bytes()
    chunk.write_bytes(original[: len(original) // 2])
    shard = c.run / "captions" / "retrieval" / "000000.parquet"
    want = shard.read_bytes()
    (c.run / "captions" / "retrieval" / "_done" / "000000.json").unlink()
    code, _, err = _call(["run", str(c.folder / "m.yaml"), "--stage", "caption"], capsys)
    assert code == 0, err[-3000:]
    assert chunk.read_bytes() == original and shard.read_bytes() == want
    assert "cut off" in err and f"{chunk}" in err and "embedding chunk 000000 again" in err


def test_a_cut_evaluation_cache_is_computed_again(made, copy_of_made, capsys):
    """The cached embeddings of a model, cut off: the metrics are made again and equal the originals."""
    c = copy_of_made
    caches = sorted(c.run.glob("evaluate/eval/embeddings/base/*.npy"))
    originals = {p: p.read_bytes() for p in caches}
    for path in caches:
        path.write_bytes(originals[path][: len(originals[path]) // 2])
    metrics = sorted(c.run.glob("evaluate/eval/metrics/base.json"))
    want = [json.loads(p.read_text()) for p in metrics]
    (c.run / "evaluate" / "eval" / "_done" / "base.json").unlink()
    code, _, err = _call(["run", str(c.folder / "m.yaml"), "--stage", "evaluate"], capsys)
    assert code == 0, err[-3000:]
    assert caches and all(p.read_bytes() == originals[p] for p in caches)
    assert metrics and [json.loads(p.read_text()) for p in metrics] == want
    assert "damaged cache" in err


def test_the_suite_has_at_least_160_cases():
    assert len(CASES) >= 160
    stages = {p.id.split("-")[0] for p in CASES}
    assert {"download", "images", "caption", "finetune", "realign", "evaluate"} <= stages


INSPECT_DAMAGE = {
    "caption-parquet-edited-mtime-put-back": (
        edited_keeping_mtime("captions/retrieval/000000.parquet"),
        "<run>/captions/retrieval/000000.parquet content (sha256) differs from its marker",
    ),
    "caption-marker-cut": (cut(CAPTION_MARKER), f"<run>/{CAPTION_MARKER}: marker is not valid JSON"),
    "caption-marker-a-list": (json_file(CAPTION_MARKER, []), "marker is not a JSON object (a list)"),
    "image-tar-half-cut": (cut("images/000000.tar"), "<run>/images/000000.tar size 10240 != 20480"),
}


@pytest.mark.parametrize("kind", list(INSPECT_DAMAGE))
def test_inspect_names_a_damaged_unit_and_shows_the_others(made, copy_of_made, capsys, kind):
    """As `status` does: the page (exit 0) leaves unit 000000 out and names it with what differs and
    the repair command; the summary and cards are the other unit's alone; stderr says it too."""
    c = copy_of_made
    damage, problem = INSPECT_DAMAGE[kind]
    damage(c)
    code, out, err = _call(["inspect", str(c.folder / "m.yaml"), "--captions", "retrieval"], capsys)
    assert code == 0, err[-3000:]
    text = (c.run / "inspect" / "captions-retrieval" / "index.html").read_text()
    damaged = text[text.index("<section id='damaged'>") : text.index('<section id="summary">')]
    assert "1 damaged unit left out" in damaged and "damaged unit 000000: " in damaged
    assert html.escape(_expected(problem, c.folder, c.assets)) in damaged
    assert html.escape(f"`mcip run {c.folder / 'm.yaml'} --repair` redoes them") in damaged
    assert "<b>3</b> images in the chosen shards" in text and text.count("class='card'") == 3
    assert "000001/" in text and "000000/" not in text
    assert "of 3 images shown (all of the chosen shards)" in text
    assert "inspect: 1 damaged unit(s) left out" in err and _expected(problem, c.folder, c.assets) in err


def test_inspect_cuts_a_long_caption_and_says_how_many_were_sampled(made, copy_of_made, capsys):
    """A 50,000-character caption (in a shard whose marker records it, as a stage that wrote it
    would) is shown cut to 10,000 with a note; the counter says 4 of 6 images were sampled."""
    from shards import markers, verify

    c = copy_of_made
    folder = c.run / "captions" / "retrieval"
    rows = pq.read_table(folder / "000000.parquet").to_pylist()
    long_caption = "a red " + "x" * 49_994
    rows[0]["captions"] = [long_caption, *rows[0]["captions"][1:]]
    pq.write_table(
        pa.Table.from_pylist(rows, schema=pq.read_schema(folder / "000000.parquet")),
        folder / "000000.parquet",
    )
    marker = markers.read_marker(folder, "000000")
    marker["outputs"] = verify.outputs_record(folder, [folder / "000000.parquet"])
    markers.write_marker(folder, "000000", marker)

    page = c.folder / "page"
    argv = [
        "inspect",
        str(c.folder / "m.yaml"),
        "--captions",
        "retrieval",
        "--samples",
        "4",
        "--out",
        str(page),
    ]
    code, _, err = _call(argv, capsys)
    assert code == 0, err[-3000:]
    text = (page / "index.html").read_text()
    assert "[cut: 50,000 characters in all, the first 10,000 shown]" in text
    assert "x" * 9_994 in text and "x" * 9_995 not in text
    assert len(text) < 200_000
    assert "of 4 sampled images shown (the first 4 of 6 in the chosen shards)" in text


def test_a_hash_cache_entry_that_is_not_ours_is_hashed_again(made, copy_of_made, capsys, monkeypatch):
    """`$MCIP_CACHE_DIR/sha256/*.json` that are valid JSON but not entries (`[]`): ignored, hashed
    again and rewritten; `status` works."""
    c = copy_of_made
    cache = c.folder / "cache"
    monkeypatch.setenv("MCIP_CACHE_DIR", str(cache))
    assert _call(["status", str(c.folder / "m.yaml")], capsys)[0] == 0
    entries = sorted((cache / "sha256").glob("*.json"))
    assert entries
    for entry in entries:
        entry.write_text("[]")
    monkeypatch.setattr(identity, "_memory", {})  # as a new process: only the files remember
    code, out, err = _call(["status", str(c.folder / "m.yaml")], capsys)
    assert code == 0 and out.count("[complete]") == 5, err[-3000:]
    assert all(isinstance(json.loads(e.read_text()), dict) for e in entries)


def test_inspect_and_export_write_where_they_may_when_the_manifest_reads_the_run_root(
    made, copy_of_made, capsys
):
    """An evaluation over this run's own shards makes the run root an input; inspect still writes
    its page into `<root>/inspect/`, and export into a folder beside the run root."""
    c = copy_of_made
    data = changed(
        made["data"],
        {"stages.evaluate.knn.data": {"layout": "shards", "path": "run"}, "stages.evaluate.knn.k": 3},
    )
    manifest = write_manifest(c.folder, data)
    code, _, err = _call(["inspect", str(manifest)], capsys)
    assert code == 0 and (c.run / "inspect" / "download" / "index.html").is_file(), err[-3000:]
    code, _, err = _call(
        ["export", str(manifest), "--captions", "retrieval", "--to", str(c.folder / "out")], capsys
    )
    assert code == 0, err[-3000:]
    assert json.loads((c.folder / "out" / "sizes.json").read_text()) == {"000000.tar": 3, "000001.tar": 3}
