"""Where a command that writes outside the stages (`export --to DIR`, `inspect --out DIR`) may write.

    check_target(folder, what, root, writes, inputs=(), allowed=None)   # StageConfigError, or nothing
    writing(path, what)                                                 # OSError -> one-line StageError

No such command writes into a folder the pipeline owns or over its own inputs:
- not inside the run root (except `allowed`, the command's own folder such as `<root>/inspect/`), nor
  inside any other run root (a folder with `manifest.resolved.yaml` at or above the target);
- not inside a folder the manifest reads (evaluation images, a config folder), and no file the
  command writes (`writes(name)` says which names it writes) is a file the manifest reads;
- the target is a folder or does not exist yet (nor does a file stand where one of its parent
  folders should be).
Paths are compared resolved (symlinks followed), so a link into the run root is the run root.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from stages.errors import StageConfigError, StageError

RUN_ROOT_FILE = "manifest.resolved.yaml"  # written into every run root (pipeline/runner.py)


def check_target(
    folder: Path,
    what: str,
    root: Path,
    writes: Callable[[str], bool],
    inputs: Iterable[Path] = (),
    allowed: Path | None = None,
) -> None:
    """Refuse `folder` as the output of `what` (e.g. "export --to") unless it is safe to write."""
    target = Path(folder).resolve()
    _check_shape(Path(folder), what)
    run_root = Path(root).resolve()
    if target.is_relative_to(run_root):
        if allowed and target.is_relative_to(Path(allowed).resolve()):
            return  # the command's own folder in the run root, where the stages write anyway
        raise StageConfigError(
            f"{what} {folder}: is inside the run root {root}, which the pipeline owns; choose a folder "
            "outside it"
        )
    foreign = next((p for p in (target, *target.parents) if (p / RUN_ROOT_FILE).is_file()), None)
    if foreign is not None and foreign != run_root:
        raise StageConfigError(
            f"{what} {folder}: is inside the run root {foreign}; choose a folder outside it"
        )
    for source in (Path(p).resolve() for p in inputs):
        if source.is_dir() and target.is_relative_to(source):
            raise StageConfigError(f"{what} {folder}: is inside {source}, which the manifest reads")
        if source.parent == target and writes(source.name):
            raise StageConfigError(
                f"{what} {folder}: would overwrite {source}, which the manifest reads; choose another folder"
            )


def _check_shape(folder: Path, what: str) -> None:
    """The target is a folder or can become one."""
    if folder.exists() and not folder.is_dir():
        raise StageConfigError(f"{what} {folder}: is a file, not a folder")
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StageConfigError(f"{what} {folder}: {parent} is a file, not a folder")
            break


@contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Around writing `path`: a file system refusal (a folder in its place, no permission, a full
    disk) is one line naming the path instead of a traceback."""
    try:
        yield
    except OSError as err:
        raise StageError(f"{what}: cannot write {path} ({err.strerror or err})") from None
