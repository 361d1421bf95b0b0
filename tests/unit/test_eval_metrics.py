"""Evaluation metrics against values worked out by hand (stages/evaluate/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.evaluate import metrics

# Four points on the unit circle's first quadrant: cos(a,b) = .8, cos(a,c) = .6, cos(b,c) = .96 ...
A, B, C, D = (1.0, 0.0), (0.8, 0.6), (0.6, 0.8), (0.0, 1.0)


def test_retrieval_map_counts_the_query_itself():
    # query a ranks a, b (both relevant): AP 1; query b ranks b, c, a: AP (1/1 + 2/3) / 2; c likewise; d: 1
    emb, labels = np.array([A, B, C, D]), np.array([0, 0, 1, 1])
    assert metrics.retrieval_map(emb, labels) == pytest.approx((1 + 5 / 6 + 5 / 6 + 1) / 4)


def test_retrieval_map_scales_embeddings_itself_and_a_class_of_one_scores_one():
    emb, labels = np.array([[3.0, 0.0], [0.0, 0.5], [2.0, 2.0]]), np.array(["x", "y", "z"])
    assert metrics.retrieval_map(emb, labels) == pytest.approx(1.0)
    aps = metrics.average_precisions(np.array([A, B, C]), np.array([0, 0, 1]))
    assert aps[2] == pytest.approx(1.0)  # c's only relevant item is itself, ranked first


def test_ties_rank_in_dataset_order():
    # identical embeddings, different labels: a finds itself first; b finds a first, itself second
    emb, labels = np.array([A, A]), np.array([0, 1])
    assert metrics.average_precisions(emb, labels).tolist() == pytest.approx([1.0, 0.5])


def test_blockwise_equals_one_block():
    rng = np.random.default_rng(0)
    emb, labels = rng.normal(size=(300, 16)), rng.integers(0, 20, 300)
    whole = metrics.retrieval_map(emb, labels, block_rows=300)
    assert metrics.retrieval_map(emb, labels, block_rows=7) == pytest.approx(whole)
    txt, owners = rng.normal(size=(50, 16)), [rng.choice(300, 3) for _ in range(50)]
    assert metrics.text_to_image_map(emb, txt, owners, block_rows=3) == pytest.approx(
        metrics.text_to_image_map(emb, txt, owners)
    )


def test_retrieval_map_by_group():
    emb, labels = np.array([A, B, C, D]), np.array([0, 0, 1, 1])
    groups = np.array(["first", "first", "second", "second"])
    assert metrics.retrieval_map_by_group(emb, labels, groups) == pytest.approx(
        {"first": (1 + 5 / 6) / 2, "second": (5 / 6 + 1) / 2}
    )


def test_knn_votes_are_weighted_by_temperature():
    train, labels = np.array([A, B, C]), np.array(["a", "b", "b"])
    query = np.array([A])
    # T = 0.1: a weighs e^10 > e^8 + e^6; T = 1: e^1 < e^0.8 + e^0.6, so the two b's win
    assert math.exp(10) > math.exp(8) + math.exp(6) and math.exp(1) < math.exp(0.8) + math.exp(0.6)
    assert metrics.knn_accuracy(train, labels, query, np.array(["a"]), k=3, temperature=0.1) == 1.0
    assert metrics.knn_accuracy(train, labels, query, np.array(["b"]), k=3, temperature=1.0) == 1.0
    assert metrics.knn_accuracy(train, labels, query, np.array(["a"]), k=1, temperature=1.0) == 1.0


def test_knn_tied_vote_picks_the_class_seen_first_and_k_is_capped():
    train, labels = np.array([C, B]), np.array(["late", "early"])  # B and C are equally close to the diagonal
    query = np.array([[0.7071, 0.7071]])
    assert metrics.knn_accuracy(train, labels, query, np.array(["late"]), k=50) == 1.0


def test_zero_shot_top1_and_top5():
    classes = np.eye(6)
    images = np.array([classes[0] + 0.1 * classes[1], classes[2], 0.5 * classes[3] + 0.6 * classes[4]])
    # image 0 -> class 0 (right); image 1 -> 2 (right); image 2 -> 4 first, 3 second (label 3: top-5 only)
    result = metrics.zero_shot_accuracy(images, np.array([0, 2, 3]), classes)
    assert result == pytest.approx({"top1": 2 / 3, "top5": 1.0})


def test_text_to_image_recall_with_one_or_several_owners():
    images = np.array([A, B, C, D])
    texts = np.array([A, D, [0.7, 0.7]])
    # text 0 ranks a, b, c, d; text 1 ranks d, c, b, a; text 2 ranks b = c (tie: b first), then a = d
    owners = [2, [0, 3], [0, 3]]
    result = metrics.text_to_image_recall(images, texts, owners, ks=(1, 3))
    assert result == pytest.approx({"R@1": 1 / 3, "R@3": 1.0})


def test_text_to_image_map():
    images, texts = np.array([A, B, C, D]), np.array([A, D])
    # text 0: owner c at rank 3 -> 1/3; text 1: owners d (rank 1) and a (rank 4) -> (1 + 2/4) / 2
    assert metrics.text_to_image_map(images, texts, [2, [0, 3]]) == pytest.approx((1 / 3 + 0.75) / 2)
