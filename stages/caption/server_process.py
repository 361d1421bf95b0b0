"""The inference server of the `server` caption backend when the manifest says `serve`: started per task
from the command template, waited for, and stopped when the task ends, fails or is interrupted.

    serve: "vllm serve {model} --port {port}"        run with /bin/sh (so `VAR={gpu} cmd` works)
    {model}  caption.model     {port}  server.port or a free port     {gpu}  this task's local rank
                                                                              (SLURM_LOCALID / LOCAL_RANK)
The server's output goes to `<root>/logs/caption/server-rank<R>.log`. It runs in its own process
group, which is terminated (then killed) on the way out; it also gets SIGTERM if this process dies
without cleaning up (PR_SET_PDEATHSIG), so an scancel'd or SIGKILLed task leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from captioning.server import ServerUnavailable
from stages.base import RunContext
from stages.errors import ShardError, StageConfigError
from stages.layout import RunLayout

log = logging.getLogger(__name__)

HEALTH_PATHS = ("/health", "/v1/models")
STOP_GRACE_S = 20.0


@contextlib.contextmanager
def serving(cfg, ctx: RunContext, layout: RunLayout) -> Iterator:
    """`cfg` as is for every other backend; for `server` with `serve`, a copy whose `server.endpoint`
    is the server started here. A server that cannot be reached mid-run is a one-line error."""
    if cfg.backend != "server":
        yield cfg
        return
    try:
        if cfg.server.serve is None:
            yield cfg
            return
        with started(cfg, ctx, layout) as endpoint:
            yield cfg.model_copy(update={"server": cfg.server.model_copy(update={"endpoint": endpoint})})
    except ServerUnavailable as err:
        raise ShardError(f"caption: {err}") from err


def local_gpu() -> str:
    return os.environ.get("SLURM_LOCALID") or os.environ.get("LOCAL_RANK") or "0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command_of(template: str, model: str, port: int, gpu: str) -> str:
    # plain replacement, not str.format: the command may hold JSON braces (--override-generation-config)
    return template.replace("{model}", model).replace("{port}", str(port)).replace("{gpu}", gpu)


@contextlib.contextmanager
def started(cfg, ctx: RunContext, layout: RunLayout) -> Iterator[str]:
    """Start the server, wait until it answers, yield its base URL; stop it on the way out."""
    section = cfg.server
    port = section.port or free_port()
    command = command_of(section.serve, cfg.model, port, local_gpu())
    logs = layout.logs("caption")
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"server-rank{ctx.rank}.log"
    endpoint = f"http://127.0.0.1:{port}"
    log.info("caption: starting the server: %s (log: %s)", command, log_path)
    with open(log_path, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n".encode())
        out.flush()
        process = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {command}"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
            preexec_fn=_die_with_parent,
        )
    try:
        _wait_ready(process, endpoint, section.startup_timeout_s, log_path)
        log.info("caption: server ready at %s (pid %d)", endpoint, process.pid)
        yield endpoint
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the group may outlive its leader (engine workers): make sure it is gone
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _wait_ready(process: subprocess.Popen, endpoint: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StageConfigError(
                f"caption server exited with code {process.returncode} while starting: "
                f"{_last_line(log_path)} (log: {log_path})"
            )
        for path in HEALTH_PATHS:
            try:
                with urllib.request.urlopen(endpoint + path, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                continue
        time.sleep(0.5)
    raise StageConfigError(
        f"caption server did not answer {' or '.join(HEALTH_PATHS)} within startup_timeout_s={timeout_s:g} "
        f"(log: {log_path})"
    )


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
