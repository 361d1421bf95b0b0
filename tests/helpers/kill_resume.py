"""Run the CLI in a process group of its own, SIGKILL the group at a chosen moment, and compare run
roots by content. Used by tests/integration/test_kill_resume.py (issue 15).

`CliRun` starts `python -m pipeline ARGS` with its output in a log file and can wait for a condition
(a log line, a file) and kill the whole group (DataLoader workers, img2dataset's processes) at a
moment. `tree_content` reads a run root into comparable values: tar members by name and bytes,
parquet rows, the tensors of torch files by dtype, shape and bytes, npy arrays, JSON and JSON lines
without their time fields, any other file by its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable

# Fields that say when or how fast something ran, not what it produced: a marker's `finished_at`
# and each recorded output's `mtime_ns` (shards/verify.py), the seconds of a training step
# (metrics.jsonl), the download's rate.
TIME_KEYS = frozenset({"finished_at", "mtime_ns", "seconds", "images_per_s"})
POLL_S = 0.005


def _drop_time(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_time(v) for k, v in value.items() if k not in TIME_KEYS}
    if isinstance(value, list):
        return [_drop_time(v) for v in value]
    return value


def _torch_value(value: Any) -> Any:
    """Tensors as (dtype, shape, sha256 of their bytes); containers walked; anything else as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return ("tensor", str(value.dtype), tuple(value.shape), hashlib.sha256(raw).hexdigest())
    if isinstance(value, dict):
        return {str(k): _torch_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_torch_value(v) for v in value]
    return value


def _tar_members(path: Path) -> list[tuple[str, str]]:
    with tarfile.open(path) as tar:
        return [
            (m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest() if m.isfile() else "not a file")
            for m in tar.getmembers()
        ]


def file_content(path: Path) -> Any:
    """A comparable value for one file's content."""
    name = path.name
    if name.endswith(".tar"):
        return ("tar", _tar_members(path))
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return ("parquet", str(table.schema), _drop_time(table.to_pylist()))
    if name.endswith((".pt", ".pth")):
        import torch

        return ("torch", _torch_value(torch.load(path, map_location="cpu", weights_only=False)))
    if name.endswith(".npy"):
        import numpy as np

        array = np.load(path, allow_pickle=False)
        return ("npy", str(array.dtype), array.shape, hashlib.sha256(array.tobytes()).hexdigest())
    if name.endswith(".json"):
        return ("json", _drop_time(json.loads(path.read_text())))
    if name.endswith(".jsonl"):
        return ("jsonl", [_drop_time(json.loads(line)) for line in path.read_text().splitlines()])
    return ("bytes", hashlib.sha256(path.read_bytes()).hexdigest())


def tree_content(root: Path, keep: Callable[[Path], bool] = lambda relative: True) -> dict[str, Any]:
    """Relative path -> content of every file under `root` whose relative path `keep` accepts."""
    root = Path(root)
    return {
        str(p.relative_to(root)): file_content(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and keep(p.relative_to(root))
    }


def content_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """What differs between two `tree_content` results, one line per file."""
    lines = [f"missing: {p}" for p in sorted(set(expected) - set(actual))]
    lines += [f"extra: {p}" for p in sorted(set(actual) - set(expected))]
    for path in sorted(set(expected) & set(actual)):
        if expected[path] != actual[path]:
            lines.append(f"differs: {path}: {first_difference(expected[path], actual[path])}")
    return lines


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """Where two nested values first differ, and the two values there (cut to 200 characters)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
            if x != y:
                return first_difference(x, y, f"{where}.{key}")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return first_difference(x, y, f"{where}[{i}]")
    return f"{where or 'value'}: expected {a!r:.200} got {b!r:.200}"


class CliRun:
    """`python -m pipeline ARGS` in a process group of its own, its output appended to `log_path`."""

    def __init__(self, args: list[str], cwd: Path, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = Path(log_path)
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._text = ""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *args],
                cwd=cwd,
                env=env,
                start_new_session=True,
                stdout=log,
                stderr=log,
            )

    def text(self) -> str:
        """This run's output so far."""
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            new = log.read()
        self._offset += len(new)
        self._text += new.decode(errors="replace")
        return self._text

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, is_ready: Callable[[], bool], timeout_s: float = 600) -> float | None:
        """Poll until `is_ready()`; the monotonic time it was seen, or None if the process exited first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if is_ready():
                return time.monotonic()
            if not self.is_running():
                return time.monotonic() if is_ready() else None
            time.sleep(POLL_S)
        self.kill_group()
        raise TimeoutError(f"not ready after {timeout_s} s:\n{self.tail()}")

    def kill_at(self, moment: float) -> bool:
        """SIGKILL the process group at monotonic `moment`; True if the process was still running then."""
        while time.monotonic() < moment and self.is_running():
            time.sleep(min(POLL_S, max(0.0, moment - time.monotonic())))
        was_running = self.is_running()
        self.kill_group()
        return was_running

    def kill_group(self) -> None:
        """SIGKILL every process of the group, and wait until none is left."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:  # the group is empty
                self.process.wait(timeout=30)
                return
            if self.process.poll() is None:
                self.process.wait(timeout=30)
            time.sleep(0.02)  # orphaned members are reparented, then reaped
        raise AssertionError(f"processes of group {self.process.pid} outlived SIGKILL")

    def finish(self, timeout_s: float = 600) -> int:
        """Wait for the exit code; whatever is left of the group is killed."""
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            self.kill_group()
