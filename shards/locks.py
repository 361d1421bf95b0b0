"""One process per lock file: an exclusive POSIX record lock held while a stage runs on one rank.

The lock file `<folder>/<name>.lock` holds the owner's pid and host, so a second process can say who
holds it. The kernel releases the lock when its process exits, however it exits (kill -9 included),
so a lock left by a dead process is simply taken over: nothing to clean up by hand. A POSIX lock
(`lockf`), not `flock`: it belongs to the process, so forked DataLoader workers do not inherit it and
a worker still dying after its killed parent cannot keep the rank locked; it also works over NFS.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path


class LockHeld(RuntimeError):
    """Another live process holds the lock; `owner` is what it wrote (pid, host)."""

    def __init__(self, path: Path, owner: dict) -> None:
        super().__init__(f"{path} is held by pid {owner.get('pid', '?')} on host {owner.get('host', '?')}")
        self.path, self.owner = path, owner


class LockUnusable(RuntimeError):
    """The lock file's place holds something a lock cannot be made of (a folder, a file where its
    folder should be, no permission); the message names the path."""


class FileLock:
    """`with FileLock(path):` holds `path` exclusively or raises `LockHeld` at once (never waits)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_NOFOLLOW: a symlink in its place is refused, never followed and truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise LockUnusable(
                f"{self.path}: cannot be used as a lock file ({_why(self.path, err)})"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
            owner = _read_owner(fd)
            os.close(fd)
            raise LockHeld(self.path, owner) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock; the file stays (unlinking would race)
            self._fd = None


def _why(path: Path, err: OSError) -> str:
    if path.is_symlink():
        return "it is a symbolic link; remove it"
    if path.is_dir():
        return "it is a folder; remove it"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"{parent} is a file, not a folder"
    return err.strerror or str(err)


def _read_owner(fd: int) -> dict:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # being written right now, or not ours
        return {}
    return owner if isinstance(owner, dict) else {}
