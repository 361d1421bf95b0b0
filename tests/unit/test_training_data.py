"""Training data: key join, deterministic order, rank split and exact resume position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shards.captions import write_caption_shard
from stages.errors import ShardError
from stages.training.data import (
    CaptionedImages,
    epoch_loader,
    eval_transform,
    index_samples,
    rank_positions,
    train_transform,
)
from tests.conftest import make_image_shards


class _Tokenizer:
    context_length = 4

    def __call__(self, texts):
        return torch.tensor([[len(t), 1, 2, 3] for t in texts])


def _captions(root, unit, keys, per_key):
    rows = [{"key": k, "captions": [f"cap {k} {i}" for i in range(per_key(k))]} for k in keys]
    write_caption_shard(root / "captions" / "t" / f"{unit}.parquet", rows)


@pytest.fixture
def run_root(tmp_path):
    keys = make_image_shards(tmp_path, shards=2, per_shard=6)
    for unit, unit_keys in zip(("000000", "000001"), keys):
        _captions(tmp_path, unit, unit_keys, lambda k: int(k) % 4)  # 0..3 captions per image
    return tmp_path


def _dataset(root, k=2, transform=None):
    refs = index_samples(root, ["000000", "000001"], "t")
    mean, std = (0.5,) * 3, (0.5,) * 3
    return CaptionedImages(refs, transform or eval_transform(16, mean, std), _Tokenizer(), k=k, seed=7)


def test_join_by_key_with_classes_and_caption_masks(run_root):
    dataset = _dataset(run_root)
    assert len(dataset) == 12
    item = dataset[3]  # key 000000003: 3 captions, capped at k=2; class 0
    assert item["image"].shape == (3, 16, 16) and item["cls"] == 0
    assert item["mask"].tolist() == [True, True]
    assert item["tokens"][:, 0].tolist() == [len("cap 000000003 0"), len("cap 000000003 1")]
    assert dataset[4]["mask"].tolist() == [False, False]  # key 4: no captions


def test_key_mismatch_names_the_caption_shard_and_both_counts(run_root):
    _captions(run_root, "000001", ["x"] * 5, lambda k: 1)
    with pytest.raises(
        ShardError, match=r"000001.parquet: its keys do not match the image shard's \(5 vs 6 keys\)"
    ):
        index_samples(run_root, ["000000", "000001"], "t")


def test_ranks_split_each_epoch_without_overlap():
    order = np.random.default_rng(0).permutation(23)
    parts = [rank_positions(order, r, 2, 4, 8) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 8
    assert not set(parts[0]) & set(parts[1])


@pytest.mark.parametrize("world, accumulation", [(1, 6), (2, 3), (3, 2), (6, 1)])
def test_a_step_trains_the_same_samples_whatever_the_number_of_processes(world, accumulation):
    """Global batch 12 = micro batch 2 x processes x accumulation: step s is positions [12 s, 12 s + 12)
    of the epoch's order; a resume from step 2 on another number of processes continues from there."""
    order = np.random.default_rng(0).permutation(40)  # 3 global batches; 4 samples left out
    shares = [rank_positions(order, r, world, 2, 12).reshape(3, accumulation, 2) for r in range(world)]
    for step in range(3):
        seen = np.concatenate([share[step].reshape(-1) for share in shares])
        assert sorted(seen) == sorted(order[12 * step : 12 * step + 12])
    resumed = np.concatenate([rank_positions(order, r, world, 2, 12, start_step=2) for r in range(world)])
    assert sorted(resumed) == sorted(order[24:36])


def test_resume_position_continues_with_the_very_next_sample(run_root):
    dataset = _dataset(run_root, transform=train_transform(16, (0.5,) * 3, (0.5,) * 3))
    full = list(
        epoch_loader(dataset, epoch=1, rank=0, world_size=1, micro_batch=3, global_batch=3, workers=2)
    )
    resumed = list(
        epoch_loader(
            dataset, epoch=1, rank=0, world_size=1, micro_batch=3, global_batch=3, start_step=2, workers=0
        )
    )
    assert [b["index"].tolist() for b in resumed] == [b["index"].tolist() for b in full[2:]]
    for a, b in zip(full[2:], resumed):  # same augmentations whatever the worker count
        assert torch.equal(a["image"], b["image"])
    other_epoch = list(
        epoch_loader(dataset, epoch=2, rank=0, world_size=1, micro_batch=3, global_batch=3, workers=0)
    )
    assert [b["index"].tolist() for b in other_epoch] != [b["index"].tolist() for b in full]
