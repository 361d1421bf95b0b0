"""The inference server of the `server` caption backend when the manifest says `serve`: started per task
from the command template, waited for, and stopped when the task ends, fails or is interrupted.

    serve: "vllm serve {model} --port {port}"        run with /bin/sh (so `VAR={gpu} cmd` works)
    {model}  caption.model     {port}  server.port or a free port     {gpu}  this task's local rank
                                                                              (SLURM_LOCALID / LOCAL_RANK)
With `server.gpus: [0, 1, ...]` one task starts one server per listed GPU (`{gpu}` each, free ports)
and the client balances its requests over them. The server's output goes to
`<root>/logs/caption/server-rank<R>[-gpu<G>].log`. It runs in its own process group, which is
terminated (then killed) on the way out; it also gets SIGTERM if this process dies without cleaning
up (PR_SET_PDEATHSIG), so an scancel'd or SIGKILLed task leaves no server behind.

The stage talks only to the process it started: a fixed `server.port` that is already taken is an
error before anything starts, and the server counts as ready only while its process lives and the
port's listening socket belongs to its process group (read from /proc), so the API key never goes to
another process that happens to answer on that port.
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
        with contextlib.ExitStack() as stack:
            gpus = cfg.server.gpus or [local_gpu()]
            named = cfg.server.gpus is not None
            urls = [stack.enter_context(started(cfg, ctx, layout, gpu, named)) for gpu in gpus]
            update = {"endpoint": urls[0]} if len(urls) == 1 else {"endpoints": urls}
            yield cfg.model_copy(update={"server": cfg.server.model_copy(update=update)})
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


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def started(
    cfg, ctx: RunContext, layout: RunLayout, gpu: str | None = None, per_gpu: bool = False
) -> Iterator[str]:
    """Start the server, wait until it answers, yield its base URL; stop it on the way out."""
    section = cfg.server
    if section.port is not None and not port_is_free(section.port):
        raise StageConfigError(
            f"caption: server.port {section.port} is already in use by another process; the stage only "
            "talks to the server it starts: free the port or leave server.port out (a free port is taken)"
        )
    port = section.port or free_port()
    gpu = gpu if gpu is not None else local_gpu()
    command = command_of(section.serve, cfg.model, port, gpu)
    logs = layout.logs("caption")
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / (f"server-rank{ctx.rank}-gpu{gpu}.log" if per_gpu else f"server-rank{ctx.rank}.log")
    endpoint = f"http://127.0.0.1:{port}"
    log.info("caption: starting the server: %s (log: %s)", command, log_path)
    with open(log_path, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n".encode())
        out.flush()
        process = subprocess.Popen(
            ["/bin/sh", "-c", f"exec env {command}"],  # env: `VAR={gpu} cmd` works (`exec VAR=..` not)
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
            preexec_fn=_die_with_parent,
        )
    try:
        _wait_ready(process, port, section.startup_timeout_s, log_path)
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


def _wait_ready(process: subprocess.Popen, port: int, timeout_s: float, log_path: Path) -> None:
    """Until the started process answers a health check on `port`, from a socket of its own."""
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    foreign = False
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StageConfigError(
                f"caption server exited with code {process.returncode} while starting: "
                f"{_last_line(log_path)} (log: {log_path})"
            )
        owners = listening_pids(port)
        ours = owners is None or bool(owners & group_pids(process.pid))
        foreign = foreign or bool(owners) and not ours
        if ours and _answers(endpoint):
            return
        time.sleep(0.5)
    if foreign:
        raise StageConfigError(
            f"caption: another process listens on port {port}, not the server the stage started "
            f"(within startup_timeout_s={timeout_s:g}; log: {log_path}); nothing was sent to it"
        )
    raise StageConfigError(
        f"caption server did not answer {' or '.join(HEALTH_PATHS)} within startup_timeout_s={timeout_s:g} "
        f"(log: {log_path})"
    )


def _answers(endpoint: str) -> bool:
    for path in HEALTH_PATHS:
        try:
            with urllib.request.urlopen(endpoint + path, timeout=2) as answer:
                if answer.status == 200:
                    return True
        except OSError:
            continue
    return False


def listening_pids(port: int) -> set[int] | None:
    """The processes holding a TCP socket listening on `port` (Linux /proc); None where /proc cannot
    tell (then the check is left out)."""
    inodes = set()
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                        inodes.add(fields[9])
    except (OSError, ValueError, IndexError):
        return None
    if not inodes:
        return set()
    sockets = {f"socket:[{inode}]" for inode in inodes}
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in sockets for fd in fd_dir.iterdir()):
                pids.add(int(fd_dir.parent.name))
    return pids


def group_pids(pgid: int) -> set[int]:
    """The processes of process group `pgid` (the server and whatever it started)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                pids.add(int(stat.parent.name))
    return pids


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
