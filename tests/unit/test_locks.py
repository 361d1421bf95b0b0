"""The per-rank lock: a second holder is refused with the owner's pid; a killed owner's lock is taken over."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from shards.locks import FileLock, LockHeld
from tests.conftest import REPO


def _holder(path) -> subprocess.Popen:
    code = (
        f"from shards.locks import FileLock\nwith FileLock({str(path)!r}):\n    print('held', flush=True)\n"
        "    import time; time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_process_is_refused_and_a_dead_owner_is_taken_over(tmp_path):
    path = tmp_path / "locks" / "download-rank0.lock"
    owner = _holder(path)
    try:
        with pytest.raises(LockHeld) as held:
            with FileLock(path):
                pass
        assert held.value.owner["pid"] == owner.pid
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    with FileLock(path):  # the kernel released the dead process's lock
        assert path.exists()


def test_the_lock_is_released_on_exit_and_can_be_taken_again(tmp_path):
    path = tmp_path / "x.lock"
    with FileLock(path):
        pass
    with FileLock(path):
        pass
