"""The index stage's choice of index from a memory budget, its faiss builds and the recall tuning
(stages/index/build.py) on seeded clustered vectors in fp16 shard files; the SLURM plan of the stage."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from captioning.bank_search import BankVectors, ExactSearch, recall_at_k
from stages.index import IndexConfig
from stages.index.build import build_faiss, choose, held_out, train_ids, tune
from tests.conftest import make_image_shards, run_cli


def _config(**values) -> IndexConfig:
    return IndexConfig(model="RN50", models=[{"name": "m"}], **values)


def test_choice_follows_the_size_and_the_memory_budget():
    assert choose(_config(), 200_000, 512)["kind"] == "exact"
    assert choose(_config(memory_mib=4096), 1_000_000, 512)["kind"] == "hnsw"  # 2.3 GiB of fp32 + links
    roomy, tight = (
        choose(_config(memory_mib=1024), 1_000_000, 512),
        choose(_config(memory_mib=100), 1_000_000, 512),
    )
    assert roomy["kind"] == tight["kind"] == "ivfpq" and roomy["nlist"] == 4096
    assert roomy["pq_m"] == 128 and tight["pq_m"] == 64 and tight["memory_bytes"] <= 100 * 2**20
    assert choose(_config(kind="ivfpq", memory_mib=1), 1_000_000, 512)["fits_budget"] is False


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> BankVectors:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 32))
    rows = centres[rng.integers(64, size=6_000)] + 0.35 * rng.normal(size=(6_000, 32))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    folder = tmp_path_factory.mktemp("bank")
    paths = []
    for i, part in enumerate(np.array_split(rows.astype(np.float16), 3)):
        paths.append(folder / f"{i:06d}.npy")
        np.save(paths[-1], part)
    return BankVectors(paths)


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_index_reaches_the_target_recall_on_held_out_vectors(bank, kind):
    cfg = _config(kind=kind, target_recall=0.9)
    params = choose(cfg, bank.rows, bank.dim)
    train = train_ids(bank.rows, params, seed=0, held_out=300)
    sample = held_out(bank.rows, train, 300, seed=0)
    assert not np.isin(sample, train).any()
    queries = bank.gather(sample).astype(np.float32)
    _, exact = ExactSearch(bank).search(queries, 10)
    index = build_faiss(bank, params, train, seed=0)
    assert index.ntotal == bank.rows
    value, curve = tune(index, bank, params, {"recall": (queries, exact)}, 10, 0.9)
    name = "nprobe" if kind == "ivfpq" else "efSearch"
    recalls = [point["recall"] for point in curve]
    assert recalls[-1] >= 0.9 and all(r < 0.9 for r in recalls[:-1]) and value == curve[-1][name]
    if kind == "ivfpq":  # the first, cheapest setting did not reach it: the search was tuned
        assert len(curve) > 1
    from stages.index.search import approximate_search

    _, found = approximate_search(index, bank, queries, 10, {name: value})
    assert recall_at_k(found, exact) == recalls[-1]


def test_slurm_plan_runs_the_index_stage_as_a_data_stage(tmp_path):
    make_image_shards(tmp_path / "run", shards=3, per_shard=2)
    index = {"model": "RN50", "models": [{"name": "a"}, {"name": "b"}], "captions": "alt"}
    data = {"run": {"root": "run"}, "stages": {"index": index}, "slurm": {"index": {"array": 4}}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    done = run_cli("submit", str(path), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "# index: 5 of 5 units pending (tasks share the units)" in done.stdout  # 3 shards + 2 builds
    line = next(x for x in done.stdout.splitlines() if x.startswith("JOB_INDEX="))
    assert "--array=0-3" in line and "--stage index" in line
