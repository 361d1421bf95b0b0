"""Issue 23's hostile inference server, as cases of the bad-input suite's kind: the caption stage
(`backend: server`, an API key in the environment) against a real HTTP server on 127.0.0.1 that
answers badly on purpose (tests/helpers/hostile_llm.py), and against ports taken by another process.

One run with a complete `server` caption set, made against the engine simulator, is made once for the
module. Each case copies it, deletes one shard's marker (so that shard is redone), points the stage
at the hostile server and asserts what tests/component/test_bad_inputs.py does: exit code 2, one
`error:` line, the last line on stderr, no traceback, naming the problem; every finished file as it
was; and the key nowhere: not in stderr, not in any file of the run (logs included).

    .venv/bin/python -m pytest tests/component/test_bad_server_replies.py -q
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli
from stages.caption.server_process import free_port
from tests.conftest import make_image_shards
from tests.helpers.bad_inputs import changed, copy_made, digests, write_manifest
from tests.helpers.engine_simulator import EngineSimulator
from tests.helpers.hostile_llm import HostileLLM

KEY_ENV = "MCIP_TEST_SERVER_KEY"
KEY = "sk-test-9f8e7d6c5b4a39281706-SECRET"
SAMPLE = {"decoding": "sample", "max_new_tokens": 8, "min_new_tokens": 0}
PROMPTS = {"decoding": "prompts", "prompts": ["Describe it.", "What is it?"], "max_new_tokens": 8}
FAST = {"retries": 0, "backoff_s": 0.05, "timeout_s": 5, "deadline_s": 30}
REDONE = "captions/server/_done/000001.json"


def _data() -> dict:
    caption = {
        "backend": "server",
        "model": "sim",
        "captions_per_image": 3,
        "generation": SAMPLE,
        "server": {"endpoints": ["http://127.0.0.1:9"], "api_key_env": KEY_ENV, **FAST},
        "filter": {"min_words": 0, "dedupe": False},
        "batch_size": 2,
        "num_workers": 0,
    }
    return {"run": {"root": "run", "seed": 0}, "stages": {"caption": caption}}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """`made/` with m.yaml and run/: two image shards of three and their complete caption set."""
    folder = tmp_path_factory.mktemp("bad-server") / "made"
    make_image_shards(folder / "run", 2, 3)
    with pytest.MonkeyPatch.context() as patch, EngineSimulator(latency_s=0.01, capacity=4) as engine:
        patch.setenv(KEY_ENV, KEY)
        data = changed(_data(), {"stages.caption.server.endpoints": [engine.url]})
        assert cli(["run", str(write_manifest(folder, data)), "--stage", "caption"]) == 0
        assert {entry["auth"] for entry in engine.log} == {f"Bearer {KEY}"}
    return folder


@dataclass
class Case:
    mode: str | None  # the hostile server's mode; None: a `serve` case
    expect: tuple[str, ...]  # substrings of the error line (<port>: the hostile server's port)
    change: dict = field(default_factory=dict)  # manifest keys (dotted, under stages.caption) -> values


def case(id_: str, mode: str | None, expect, **change) -> pytest.param:
    expected = (expect,) if isinstance(expect, str) else tuple(expect)
    return pytest.param(Case(mode, expected, {k.replace("__", "."): v for k, v in change.items()}), id=id_)


FAILED = "caption shard 000001: 3 of 3 images failed on the server (max_failed_fraction 0.5); last error: "
CASES = [
    case("401-echoing-the-key", "401-echo", ("refuses the requests (HTTP 401:", "check the API key")),
    case("401-echoing-the-key-prompts", "401-echo", "HTTP 401: ", generation=PROMPTS, captions="prompted"),
    case("no-choices-sample", "no-choices", FAILED + "answer has no choices (`choices: []`)"),
    case(
        "no-choices-prompts",
        "no-choices",
        FAILED[20:] + "answer has no choices",
        generation=PROMPTS,
        captions="p",
    ),
    case("fewer-choices-than-n", "fewer-choices", FAILED + "answer has no choices"),
    case(
        "trickle-1-byte-per-0.5s",
        "trickle",
        FAILED + "no whole answer within deadline_s=1",
        server__deadline_s=1,
    ),
    case("huge-reply", "huge", FAILED + "answer larger than max_reply_bytes=1048576"),
    case(
        "huge-reply-small-limit",
        "huge",
        "answer larger than max_reply_bytes=4096",
        server__max_reply_bytes=4096,
    ),
    case(
        "caption-over-10000-chars", "long-caption", FAILED + "a caption of 20000 characters (more than 10000)"
    ),
    case("invalid-json", "invalid-json", (FAILED + "answer is not JSON: <html>502 Bad Gateway",)),
    case("redirect", "redirect", "HTTP 307: redirect to http://127.0.0.1:<port>/stolen not followed"),
]


def _error_line(err: str) -> str:
    """The one `error:` line, which is also the last line on stderr (after the progress bar)."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert err.rstrip("\n").splitlines()[-1] == errors[0] and err.endswith("\n"), err[-3000:]
    return errors[0]


def _files_holding(folder: Path, secret: str) -> list[str]:
    """Every file under `folder` (the run's logs, markers, shards, manifests) holding `secret`."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.fixture
def copy(made, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(KEY_ENV, KEY)
    folder = copy_made(made, tmp_path / "copy")
    (folder / "run" / REDONE).unlink()
    return folder


def _run(folder: Path, data: dict, capsys) -> tuple[int, str]:
    manifest = write_manifest(folder, data)
    capsys.readouterr()
    code = cli(["run", str(manifest), "--stage", "caption"])
    return code, capsys.readouterr().err


def _check(copy: Path, code: int, err: str, before: dict, expect: tuple[str, ...], port: int) -> None:
    assert code == 2, err[-3000:]
    line = _error_line(err)
    for text in expect:
        assert text.replace("<port>", str(port)) in line, line
    assert KEY not in err and _files_holding(copy, KEY) == []
    assert digests(copy / "run") == before, "a finished output changed"
    assert not (copy / "run" / REDONE).exists(), "the redone shard was marked done"


@pytest.mark.parametrize("bad", CASES)
def test_a_hostile_server_is_one_line_exit_2_and_changes_nothing(made, copy, capsys, bad: Case):
    data = yaml.safe_load((copy / "m.yaml").read_text())
    before = digests(copy / "run")
    with HostileLLM(bad.mode) as server:
        change = {"stages.caption.server.endpoints": [server.url]}
        change.update({f"stages.caption.{k}": v for k, v in bad.change.items()})
        code, err = _run(copy, changed(data, change), capsys)
        seen = list(server.seen)
    _check(copy, code, err, before, bad.expect, server.port)
    assert seen and all(path != "/stolen" for _, path, _ in seen), "a redirect was followed"


def test_serve_on_a_port_another_process_listens_on_sends_it_nothing(made, copy, capsys):
    data = yaml.safe_load((copy / "m.yaml").read_text())
    before = digests(copy / "run")
    with HostileLLM("no-choices") as other:
        server = {"serve": "sleep 30", "port": other.port, "api_key_env": KEY_ENV, "startup_timeout_s": 20}
        code, err = _run(copy, changed(data, {"stages.caption.server": server}), capsys)
        seen = list(other.seen)
    expect = (f"server.port {other.port} is already in use by another process", "leave server.port out")
    _check(copy, code, err, before, expect, other.port)
    assert seen == []


def test_serve_whose_port_another_process_takes_meanwhile_sends_it_nothing(made, copy, capsys):
    """The port is free when the stage starts its server (which never listens); another process
    takes it while the stage waits: that process answers /health, but it is not ours."""
    data = yaml.safe_load((copy / "m.yaml").read_text())
    before = digests(copy / "run")
    port, others = free_port(), []
    timer = threading.Timer(0.3, lambda: others.append(HostileLLM("no-choices", port=port).__enter__()))
    timer.start()
    try:
        server = {"serve": "sleep 30", "port": port, "api_key_env": KEY_ENV, "startup_timeout_s": 4}
        code, err = _run(copy, changed(data, {"stages.caption.server": server}), capsys)
    finally:
        timer.join()
        for other in others:
            other.__exit__(None, None, None)
    _check(
        copy, code, err, before, (f"another process listens on port {port}", "nothing was sent to it"), port
    )
    assert others and all(method == "GET" and auth is None for method, _, auth in others[0].seen)


def test_the_key_is_in_no_file_a_good_run_writes(made, copy, capsys):
    """The complete run itself (its logs, markers, shards, resolved manifest) and a redo of one shard
    with verbose logging: the key was sent (the simulator logged it) but is written nowhere."""
    data = yaml.safe_load((copy / "m.yaml").read_text())
    assert _files_holding(made, KEY) == []
    with EngineSimulator(latency_s=0.01, capacity=4) as engine:
        manifest = write_manifest(copy, changed(data, {"stages.caption.server.endpoints": [engine.url]}))
        capsys.readouterr()
        assert cli(["-v", "run", str(manifest), "--stage", "caption"]) == 0
        assert engine.log and all(entry["auth"] == f"Bearer {KEY}" for entry in engine.log)
    err = capsys.readouterr().err
    assert (copy / "run" / REDONE).exists()
    assert KEY not in err and _files_holding(copy, KEY) == []


def test_the_suite_covers_every_hostile_mode():
    from tests.helpers.hostile_llm import MODES

    assert {p.values[0].mode for p in CASES} == set(MODES)


def test_server_text_is_scrubbed_before_it_is_cut():
    """The key replaced wherever it is, also where the text is cut (no prefix of it left), bearer
    tokens and `api_key=` values hidden, control characters dropped, one bounded line."""
    from captioning.server_replies import LINE_CHARS, Scrubber

    scrub = Scrubber([KEY])
    cut_in_the_key = "x" * (LINE_CHARS - 5) + KEY
    assert KEY[:5] not in scrub(cut_in_the_key) and len(scrub(cut_in_the_key)) <= LINE_CHARS + 3
    text = scrub(f"bad key\n\x00Bearer other-token; api_key={KEY[::-1]} {KEY}".encode())
    assert text == "bad key Bearer ***; api_key=*** ***"
