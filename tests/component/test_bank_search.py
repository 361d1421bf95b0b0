"""The caption bank at scale: blocked exact search, IVF-PQ, bank embedding split over rank processes,
resume after kill -9, and the search's memory cap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from captioning.bank_search import (
    FP16_COSINE_TOLERANCE,
    ApproximateSearch,
    BankVectors,
    ExactSearch,
    build_ivfpq,
    exact_reference,
    plan_blocks,
    recall_at_k,
)
from captioning.knn import top_k_above
from shards import markers
from shards.marker_schema import CacheMarker
from stages.caption import RetrievalSection
from stages.caption.bank import Bank, prepare_bank, prepare_index
from stages.errors import ShardError

REPO = Path(__file__).resolve().parents[2]


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _write_bank(folder: Path, vectors: np.ndarray, chunk_rows: int) -> BankVectors:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, len(vectors), chunk_rows)):
        paths.append(folder / f"{i:06d}.npy")
        np.save(paths[-1], vectors[start : start + chunk_rows].astype(np.float16))
    return BankVectors(paths)


@pytest.mark.parametrize("memory_mib", [0.05, 64])
def test_blocked_search_equals_brute_force_with_ties_and_k_beyond_the_bank(tmp_path, memory_mib):
    vectors = _unit(3000, 16, 0)
    vectors[2500] = vectors[7]  # exact ties: the lower bank id first
    vectors[1200] = vectors[7]
    bank = _write_bank(tmp_path, vectors, chunk_rows=700)
    queries = np.concatenate([_unit(60, 16, 1), vectors[7:8]])
    search = ExactSearch(bank, "cpu", memory_mib)
    scores, ids = search.search(queries, 10)
    if memory_mib < 1:
        assert search.last_plan.query_rows < len(queries) or search.last_plan.bank_rows < 700
    fp16 = bank.to_float32()
    want_s, want_i = exact_reference(fp16, queries, 10)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_allclose(scores, want_s, atol=1e-6)
    assert list(ids[-1, :3]) == [7, 1200, 2500]
    # against an fp32 search of the unrounded bank: equal up to fp16 ties, scores within tolerance
    fp32_s, fp32_i = exact_reference(vectors, queries, 10)
    assert np.all(np.abs(scores - fp32_s) <= FP16_COSINE_TOLERANCE)
    exact_of_ours = np.einsum("qd,qkd->qk", queries.astype(np.float64), vectors[ids].astype(np.float64))
    differ = ids != fp32_i
    assert np.all(np.abs(exact_of_ours - fp32_s)[differ] <= 2 * FP16_COSINE_TOLERANCE)  # only near-ties
    # an image's result does not depend on the others in its batch
    alone = [search.search(queries[i : i + 1], 10) for i in (0, 33, 60)]
    for i, (s, j) in zip((0, 33, 60), alone):
        np.testing.assert_array_equal(j[0], ids[i])
        np.testing.assert_array_equal(s[0], scores[i])

    small = _write_bank(tmp_path / "small", vectors[:5], chunk_rows=2)
    s, i = ExactSearch(small, "cpu", memory_mib).search(queries[:3], 20)
    assert s.shape == (3, 20) and (i[:, :5] >= 0).all() and (i[:, 5:] == -1).all()
    assert sorted(i[0, :5]) == [0, 1, 2, 3, 4]
    hits = top_k_above(s, i, 0.2)
    assert all(len(row) <= 5 for row in hits)
    lonely = -vectors[:5].sum(0, keepdims=True)  # negative cosine with every caption: none above 0.0
    s, i = ExactSearch(small, "cpu", memory_mib).search(lonely / np.linalg.norm(lonely), 20)
    assert top_k_above(s, i, 0.0) == [[]] and (i[0, :5] >= 0).all()


def test_memory_plan_scales_blocks_to_the_budget():
    small = plan_blocks(10_000, 2_000_000, 32, 20, 64 << 20)
    assert small.bytes <= 64 << 20 and small.bank_rows * small.query_rows > 0
    big = plan_blocks(10_000, 11_000_000, 768, 20, 2 << 30)
    assert big.bytes <= 2 << 30 and big.query_rows > small.query_rows
    with pytest.raises(ValueError, match="search_memory_mib: 0 MiB is too small"):
        plan_blocks(10, 1000, 768, 20, 100_000)


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, numpy as np, torch
    from pathlib import Path
    from captioning.bank_search import BankVectors, ExactSearch
    torch.set_num_threads(1)
    folder = Path(sys.argv[1])
    bank = BankVectors(sorted(folder.glob("*.npy")))
    queries = np.random.default_rng(1).normal(size=(600, 32)).astype(np.float32)
    search = ExactSearch(bank, "cpu", 64)
    search.search(queries[:4], 20)  # warm up (thread pools, allocator)
    import threading, time
    def kib(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    # the search's own memory is anonymous (RssAnon, sampled); the bank's mapped pages are file
    # pages (RssFile), which the kernel may map ahead of use (fault-around) on a busy machine, so
    # they are checked as released once the search is done rather than at their peak
    anon_before, file_before, peak, done = kib("RssAnon:"), kib("RssFile:"), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], kib("RssAnon:"))
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    scores, ids = search.search(queries, 20)
    done.set()
    sampler.join()
    print(json.dumps({"growth_mib": (peak[0] - anon_before) / 1024, "plan": search.last_plan.bytes,
                      "file_after_mib": (kib("RssFile:") - file_before) / 1024,
                      "query_rows": search.last_plan.query_rows, "bank_rows": search.last_plan.bank_rows,
                      "ids": ids[:5].tolist()}))
    """
)


def test_two_million_row_bank_search_stays_under_a_64_mib_cap(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):  # 2M x 32 fp16 in 4 chunks (128 MiB on disk), never whole in float32
        block = rng.normal(size=(500_000, 32)).astype(np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        np.save(tmp_path / f"{i:06d}.npy", block.astype(np.float16))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["plan"] <= 64 << 20
    assert result["growth_mib"] <= 64, result  # the search's own (anonymous) memory at its peak
    assert result["file_after_mib"] <= 64, result  # the 128 MiB bank's pages are not kept mapped
    assert result["bank_rows"] < 500_000  # the cap made the bank stream through in blocks


def _section(bank: Path, **extra) -> RetrievalSection:
    return RetrievalSection(bank=bank, bank_batch_size=8, **extra)


def _captions(path: Path, n: int) -> Path:
    words = ["red", "blue", "green", "small", "large", "circle", "square", "dog", "cat", "tree", "sky"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=4)) + f" {i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _rank(tiny_models, cache: Path, bank: Path, rank: int, world: int, chunk_rows: int, wait: int = 60):
    args = [str(cache), str(bank), str(rank), str(world), str(chunk_rows)]
    args += [tiny_models["clip_arch"], str(tiny_models["clip_checkpoint"]), str(tiny_models["clip_configs"])]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.bank_embed", *args, str(wait)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )


def _finish(proc) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _load(cache: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(cache.glob("*.npy"))])


def test_two_rank_processes_embed_every_chunk_once(tmp_path, tiny_models):
    bank = _captions(tmp_path / "bank.txt", 330)
    cache = tmp_path / "cache"
    procs = [_rank(tiny_models, cache, bank, r, 2, 40) for r in (0, 1)]
    results = [_finish(p) for p in procs]
    embedded = results[0]["embedded"] + results[1]["embedded"]
    assert sorted(embedded) == [f"{i:06d}" for i in range(9)]  # 330 / 40 -> 9 chunks, each once
    assert results[1]["embedded"] == ["000001", "000003", "000005", "000007"]
    for chunk in embedded:
        assert markers.read_marker(cache, chunk, CacheMarker)["rank"] == int(chunk) % 2
    assert results[0]["rows"] == results[1]["rows"] == 330
    again = _finish(_rank(tiny_models, cache, bank, 0, 1, 40))
    assert again["embedded"] == []  # a rerun embeds nothing


def test_a_rank_waiting_for_a_missing_owner_names_the_chunk_and_rank(tmp_path, tiny_models):
    from captioning.clip_models import load_clip

    bank = _captions(tmp_path / "bank.txt", 100)
    clip = load_clip(
        tiny_models["clip_arch"], str(tiny_models["clip_checkpoint"]), tiny_models["clip_configs"]
    )
    cache = tmp_path / "cache"
    prepare_bank(_section(bank), clip, cache, 0, 1, False, 40)  # texts + all chunks
    markers.remove_marker(cache, "000001")
    with pytest.raises(ShardError, match=r"unit '000001' \(owned by rank 1\) not done after waiting 1 s"):
        prepare_bank(_section(bank, bank_wait_seconds=1), clip, cache, 0, 2, False, 40)


def test_bank_embedding_killed_mid_way_resumes_to_the_same_result(tmp_path, tiny_models):
    bank = _captions(tmp_path / "bank.txt", 3000)
    reference = tmp_path / "reference"
    _finish(_rank(tiny_models, reference, bank, 0, 1, 100))
    cache = tmp_path / "cache"
    proc = _rank(tiny_models, cache, bank, 0, 1, 100)
    deadline = time.monotonic() + 120
    while len(list((cache / "_done").glob("0*.json"))) < 3 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.stem: p.stat().st_mtime_ns for p in (cache / "_done").glob("0*.json")}
    assert 3 <= len(done_before) < 30, "the kill came after the embedding finished"
    result = _finish(_rank(tiny_models, cache, bank, 0, 1, 100))
    assert set(result["embedded"]) == {f"{i:06d}" for i in range(30)} - set(done_before)
    assert all((cache / "_done" / f"{c}.json").stat().st_mtime_ns == t for c, t in done_before.items())
    assert not list(cache.glob(".*.tmp"))
    np.testing.assert_array_equal(_load(cache), _load(reference))


def test_ivfpq_index_is_built_once_cached_and_recalls_exact_search(tmp_path, tiny_models):
    rng = np.random.default_rng(0)
    centers = _unit(64, 32, 1)
    vectors = centers[rng.integers(0, 64, 20000)] + 0.08 * rng.normal(size=(20000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder = tmp_path / "bank"
    bank_vectors = _write_bank(folder, vectors, 8000)
    queries = vectors[rng.integers(0, 20000, 300)] + 0.05 * rng.normal(size=(300, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    class Texts(list):
        pass

    bank = Bank(folder, Texts(["x"] * 20000), bank_vectors)
    section = _section(tmp_path / "bank.txt", index="ivfpq", ivf_nlist=64, ivf_nprobe=16, pq_m=16)
    approx = prepare_index(section, bank, 0, seed=0)
    index_file = next(folder.glob("ivfpq-*.faiss"))
    marker = markers.read_marker(folder, index_file.stem, CacheMarker)
    assert marker["rows"] == 20000 and not list(folder.glob(".*.tmp"))
    mtime = index_file.stat().st_mtime_ns
    approx = prepare_index(section, bank, 0, seed=0)  # cached: not built again
    assert index_file.stat().st_mtime_ns == mtime
    exact = ExactSearch(bank_vectors)
    _, want = exact.search(queries, 20)
    scores, found = approx.search(queries, 20)
    recall = recall_at_k(found, want)
    assert recall > 0.8, recall
    assert isinstance(approx, ApproximateSearch)
    # its scores are exact cosines of the candidates it found (rescored from the fp16 bank)
    fp16 = bank_vectors.to_float32()
    np.testing.assert_allclose(scores[:, 0], np.einsum("qd,qd->q", queries, fp16[found[:, 0]]), atol=1e-5)


def test_ivfpq_options_are_validated_strictly(tmp_path):
    with pytest.raises(ValueError, match="ivf_nprobe: only used with index 'ivfpq'"):
        _section(tmp_path / "b.txt", ivf_nprobe=4)
    with pytest.raises(ValueError, match="index 'flat' was replaced"):
        _section(tmp_path / "b.txt", index="flat")
    with pytest.raises(ValueError, match="pq_m: 5 does not divide"):
        build_ivfpq(_write_bank(tmp_path / "v", _unit(500, 32, 0), 500), tmp_path / "i.faiss", 4, 5)
