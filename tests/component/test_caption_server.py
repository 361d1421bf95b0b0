"""The `server` caption backend against real servers on 127.0.0.1: `transformers serve` with tiny
LLaVA-1.5 and Qwen2-VL folders (random weights), and a misbehaving proxy in front of it
(tests/helpers/flaky_server.py)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli
from stages.caption.server_process import command_of, free_port, stop
from tests.conftest import cli_env, write_caption_manifest
from tests.helpers.flaky_server import FlakyProxy
from tests.helpers.tiny_vlms import make_sized_image_shards, save_tiny_qwen2_vl, sized_jpeg

pytest.importorskip("fastapi", reason="transformers serve needs the `serving` extra")

SERVE = (
    f"{Path(sys.executable).parent / 'transformers'} serve {{model}} --host 127.0.0.1 --port {{port}} "
    "--device cpu --dtype float32"
)
# no JPEG side reaches 2x the tiny models' 32 px, so our decode (DCT-scaled while decoding) and the
# server's full decode give the processor the same pixels
SIZES = [[(48, 40), (40, 56), (36, 36), (60, 44)], [(44, 52), (56, 40), (40, 40), (52, 60)]]
PROMPTS = ["Describe the image in one sentence.", "What is in the picture?"]
GREEDY = {"decoding": "prompts", "prompts": PROMPTS, "max_new_tokens": 6, "min_new_tokens": 0}
NO_FILTER = {"filter": {"min_words": 0, "dedupe": False}}


@contextlib.contextmanager
def transformers_serve(model: Path, log: Path, port: int | None = None):
    port = port or free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            shlex.split(command_of(SERVE, str(model), port, "0")),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=cli_env(),
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "transformers serve did not start"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            time.sleep(0.3)
        yield process, url
    finally:
        stop(process)


def _run(manifest: Path, *extra: str) -> int:
    return cli(["run", str(manifest), "--stage", "caption", *extra])


def _captions(root: Path, tag: str) -> dict[str, list[str]]:
    rows = {}
    for path in sorted((root / "captions" / tag).glob("*.parquet")):
        rows.update({r["key"]: r["captions"] for r in pq.read_table(path).to_pylist()})
    return rows


def _marker(root: Path, tag: str, unit: str) -> dict:
    return json.loads((root / "captions" / tag / "_done" / f"{unit}.json").read_text())


def _in_process(tmp_path: Path, model: Path, root: str = "inproc") -> dict[str, list[str]]:
    make_sized_image_shards(tmp_path / root, SIZES)
    manifest = write_caption_manifest(
        tmp_path,
        {"backend": "vlm", "model": str(model), "generation": GREEDY, **NO_FILTER},
        root,
        f"{root}.yaml",
    )
    assert _run(manifest) == 0
    return _captions(tmp_path / root, "vlm")


def _server_manifest(
    tmp_path: Path, model: Path, server: dict, root: str, generation=GREEDY, **extra
) -> Path:
    make_sized_image_shards(tmp_path / root, SIZES)
    caption = {
        "backend": "server",
        "model": str(model),
        "server": server,
        "generation": generation,
        **NO_FILTER,
    }
    return write_caption_manifest(tmp_path, {**caption, **extra}, root, f"{root}.yaml")


@pytest.fixture(scope="module")
def llava_server(tmp_path_factory):
    from examples.tiny_models import save_tiny_llava

    folder = tmp_path_factory.mktemp("served")
    model = save_tiny_llava(folder / "llava")
    with transformers_serve(model, folder / "serve.log") as (_, url):
        yield model, url


def _unparsed(model: Path, text: str) -> str:
    """What transformers serve would answer without its Qwen response parser (picked by model_type):
    the parser decodes the output keeping special tokens and looks for `<|im_start|>assistant\n`, which
    the tiny word-level tokenizer decodes as `<|im_start|> assistant` (a real Qwen tokenizer does not),
    so the answer starts with that prompt tail and keeps the special tokens random weights emit. Undone
    here: the prompt tail cut off, special tokens dropped, as `skip_special_tokens` does."""
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(model).tokenizer
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    special |= set(tokenizer.all_special_tokens)
    tail = "<|im_start|> assistant"
    assert text.startswith(tail), text
    return " ".join(word for word in text[len(tail) :].split(" ") if word not in special)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_greedy_captions_equal_the_in_process_backend(tmp_path, llava_server, family):
    if family == "llava":
        model, url = llava_server
        server = contextlib.nullcontext((None, url))
    else:
        model = save_tiny_qwen2_vl(tmp_path / "qwen2_vl")
        server = transformers_serve(model, tmp_path / "serve.log")
    expected = _in_process(tmp_path, model)
    assert all(len(c) == 2 for c in expected.values())
    with server as (_, url):
        manifest = _server_manifest(tmp_path, model, {"endpoint": url, "max_concurrency": 3}, "served")
        assert _run(manifest) == 0
    served = _captions(tmp_path / "served", "server")
    if family == "qwen2_vl":
        served = {key: [_unparsed(model, text) for text in texts] for key, texts in served.items()}
    assert served == expected
    assert _marker(tmp_path / "served", "server", "000001")["counts"] == {
        "images": 4,
        "captions": 8,
        "images_without_captions": 0,
        "corrupt_images": 0,
        "failed_requests": 0,
    }


def _error_line(stderr: str) -> str:
    """The stage's one-line error (tqdm's last redraw may come after it)."""
    lines = re.findall(r"error: [^\r\n]*", stderr)
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_sampling_sends_k_requests_where_n_is_refused(tmp_path, llava_server, capsys):
    """transformers serve ignores `n` and refuses `min_tokens`: both are detected once."""
    model, url = llava_server
    sample = {"decoding": "sample", "max_new_tokens": 6, "min_new_tokens": 2}
    manifest = _server_manifest(tmp_path, model, {"endpoint": url}, "sampled", sample, captions_per_image=3)
    assert _run(manifest) == 0
    logged = capsys.readouterr().err
    captions = _captions(tmp_path / "sampled", "server")
    assert len(captions) == 8 and all(len(c) == 3 for c in captions.values())
    assert "refuses `min_tokens`" in logged and "k requests per image" in logged


def test_server_killed_mid_shard_is_an_error_and_rerun_resumes(tmp_path, llava_server):
    model, url = llava_server
    sizes = [SIZES[i % 2] for i in range(10)]
    settings = {"max_concurrency": 1, "retries": 1, "backoff_s": 0.1}
    port = free_port()
    manifests = {}
    for root in ("straight", "killed"):
        make_sized_image_shards(tmp_path / root, sizes)
        endpoint = url if root == "straight" else f"http://127.0.0.1:{port}"
        caption = {"backend": "server", "model": str(model), "generation": GREEDY, **NO_FILTER}
        caption["server"] = {"endpoint": endpoint, **settings}
        manifests[root] = write_caption_manifest(tmp_path, caption, root, f"{root}.yaml")
    assert _run(manifests["straight"]) == 0

    done = tmp_path / "killed" / "captions" / "server" / "_done"
    with transformers_serve(model, tmp_path / "serve.log", port) as (server, _):
        stage = subprocess.Popen(
            [sys.executable, "-m", "stages.caption", str(manifests["killed"])],
            cwd=tmp_path,
            env=cli_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 180
        while not list(done.glob("*.json")) and time.monotonic() < deadline and stage.poll() is None:
            time.sleep(0.02)
        stop(server)  # mid-stage (a shard is being captioned)
        _, err = stage.communicate(timeout=120)
    assert stage.returncode == 2, err
    last = _error_line(err)
    assert last.startswith("error: caption: caption server http://127.0.0.1:") and "unreachable" in last
    assert 1 <= len(list(done.glob("*.json"))) < 10, "the server should have died mid-stage"

    with transformers_serve(model, tmp_path / "serve.log", port):
        assert _run(manifests["killed"]) == 0
    assert _captions(tmp_path / "killed", "server") == _captions(tmp_path / "straight", "server")
    assert len(_captions(tmp_path / "killed", "server")) == 40


def _fragment(n: int) -> str:
    """A piece of picture n's data URL that no other picture's has (JPEG headers are shared)."""
    sizes = [size for shard in SIZES for size in shard]
    data = [base64.b64encode(sized_jpeg(i, *size)).decode() for i, size in enumerate(sizes)]
    for start in range(len(data[n]) - 64, 0, -16):
        piece = data[n][start : start + 48]
        if not any(piece in other for i, other in enumerate(data) if i != n):
            return piece
    raise AssertionError(f"picture {n} has no piece of its own")


def test_500s_are_retried_and_a_failing_or_hung_image_is_counted(tmp_path, llava_server):
    model, url = llava_server
    reference = _server_manifest(tmp_path, model, {"endpoint": url}, "reference")
    assert _run(reference) == 0
    expected = _captions(tmp_path / "reference", "server")

    failing, hung = _fragment(1), _fragment(6)
    with FlakyProxy(url, fail_first=True, fail=(failing,), hang=(hung,)) as proxy:
        # transformers serve answers one request at a time: few in flight, so only the hung one times out
        server = {
            "endpoint": proxy.url,
            "retries": 2,
            "backoff_s": 0.05,
            "timeout_s": 6,
            "max_concurrency": 2,
        }
        assert _run(_server_manifest(tmp_path, model, server, "flaky")) == 0
    captions = _captions(tmp_path / "flaky", "server")
    assert captions["000000001"] == [] and captions["000000006"] == []
    assert {k: v for k, v in captions.items() if v} == {
        k: v for k, v in expected.items() if k not in ("000000001", "000000006")
    }
    for unit in ("000000", "000001"):
        counts = _marker(tmp_path / "flaky", "server", unit)["counts"]
        assert counts["failed_requests"] == 1 and counts["images_without_captions"] == 1
    # the first attempt of each of the 6 good images x 2 prompts answered 500 (retried), the failing
    # image 3 times (then it counts); the hung one hung 3 times (timeouts, then it counts)
    assert proxy.answered_500 == 6 * 2 + 3 and proxy.hung == 3


def test_too_many_failures_stop_the_stage_naming_the_error(tmp_path, llava_server, capsys):
    model, url = llava_server
    with FlakyProxy(url, fail=("image_url",)) as proxy:
        server = {"endpoint": proxy.url, "retries": 0}
        assert _run(_server_manifest(tmp_path, model, server, "broken")) == 2
    # shards are written as their answers complete (stages/caption/streaming.py): under load the
    # second one can fail first, so either names the error
    assert re.fullmatch(
        r"error: caption shard 00000[01]: 4 of 4 images failed on the server \(max_failed_fraction 0\.5\); "
        r'last error: HTTP 500: \{"error": "injected failure"\}',
        _error_line(capsys.readouterr().err),
    )
    assert not list((tmp_path / "broken" / "captions" / "server" / "_done").glob("*.json"))


def _serve_processes(model: Path) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            words = cmdline.read_bytes().split(b"\0")
            if b"serve" in words and str(model).encode() in words:
                found.append(int(cmdline.parent.name))
    return found


def test_serve_starts_waits_for_and_stops_the_server(tmp_path, tiny_models):
    model = tiny_models["llava"]
    expected = _in_process(tmp_path, model)
    manifest = _server_manifest(tmp_path, model, {"serve": SERVE, "startup_timeout_s": 180}, "served")
    assert _run(manifest) == 0
    assert _captions(tmp_path / "served", "server") == expected
    log = (tmp_path / "served" / "logs" / "caption" / "server-rank0.log").read_text()
    assert "transformers" in log.splitlines()[1] and "chat/completions" in log
    assert _serve_processes(model) == [], "the stage left its server running"


def test_server_settings_are_checked_and_speed_ones_are_not_fingerprinted():
    from stages.caption import CaptionConfig

    base = {"backend": "server", "model": "org/vlm"}
    with pytest.raises(ValueError, match="exactly one of `endpoint`"):
        CaptionConfig(**base, server={"endpoint": "http://h:1", "serve": "vllm serve {model}"})
    with pytest.raises(ValueError, match="decoding 'beam' is not offered"):
        CaptionConfig(**base, server={"endpoint": "http://h:1"}, generation={"decoding": "beam"})
    with pytest.raises(ValueError, match="needs a `server` section"):
        CaptionConfig(**base)
    with pytest.raises(ValueError, match="server: not used by backend 'vlm'"):
        CaptionConfig(backend="vlm", model="m", server={"endpoint": "http://h:1"})
    fast = CaptionConfig(**base, server={"endpoint": "http://h:1", "max_concurrency": 64, "retries": 9})
    slow = CaptionConfig(**base, server={"endpoint": "http://h:1", "timeout_s": 5, "api_key_env": "KEY"})
    other = CaptionConfig(**base, server={"endpoint": "http://h:2"})
    assert fast.fingerprint_settings() == slow.fingerprint_settings() != other.fingerprint_settings()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGKILL], ids=["usr1", "kill"])
def test_an_interrupted_or_killed_stage_leaves_no_server(tmp_path, sig):
    """USR1 (SLURM's "stop"): the stage stops its server on the way out; SIGKILL: the server gets
    SIGTERM from the kernel (PR_SET_PDEATHSIG). A rerun resumes either way."""
    from examples.tiny_models import save_tiny_llava

    model = save_tiny_llava(tmp_path / "llava")
    make_sized_image_shards(tmp_path / "run", [SIZES[i % 2] for i in range(12)])
    caption = {"backend": "server", "model": str(model), "generation": GREEDY, **NO_FILTER}
    caption["server"] = {"serve": SERVE, "startup_timeout_s": 180, "max_concurrency": 1}
    manifest = write_caption_manifest(tmp_path, caption)
    done = tmp_path / "run" / "captions" / "server" / "_done"
    stage = subprocess.Popen(
        [sys.executable, "-m", "stages.caption", str(manifest)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(done.glob("*.json")) and time.monotonic() < deadline and stage.poll() is None:
            time.sleep(0.05)
        assert _serve_processes(model), "the stage should be captioning through its server"
        stage.send_signal(sig)
        assert stage.wait(60) == (130 if sig == signal.SIGUSR1 else -signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _serve_processes(model) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _serve_processes(model) == [], "the server outlived its stage"
    finally:
        stage.kill()
        for pid in _serve_processes(model):
            os.kill(pid, signal.SIGKILL)
    assert 1 <= len(list(done.glob("*.json"))) < 12
    assert _run(manifest) == 0
    assert len(_captions(tmp_path / "run", "server")) == 48
