"""Caption cleanup, nearest-neighbour search and top-k/threshold semantics."""

from __future__ import annotations

import numpy as np
import pytest

from captioning.base import CaptionerError, get_captioner
from captioning.cleanup import clean, strip_prompt
from captioning.knn import brute_force_topk, build_index, search, top_k_above


def test_strip_prompt_is_case_insensitive_and_prefers_longest():
    assert strip_prompt("A photo of a red circle", ["a photo", "a photo of"]) == "a red circle"
    assert strip_prompt("red circle", ["a photo of"]) == "red circle"


def test_clean_folds_space_drops_short_empty_and_duplicates_keeping_scores_aligned():
    captions = ["a  red\tcircle", "", "red", "a red circle", "a photo of blue  square", "two words"]
    texts, scores = clean(captions, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], prompts=["a photo of"], min_words=2)
    assert texts == ["a red circle", "blue square", "two words"]
    assert scores == [0.9, 0.5, 0.4]
    texts, scores = clean(captions, None, min_words=0, dedupe=False)
    assert texts == ["a red circle", "red", "a red circle", "a photo of blue square", "two words"]
    assert scores is None


def _unit(rows: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_faiss_flat_equals_brute_force_torch():
    bank, queries = _unit(500, 16, 0), _unit(40, 16, 1)
    scores, ids = search(build_index(bank, "flat"), queries, 7)
    want_scores, want_ids = brute_force_topk(bank, queries, 7)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_ivf_finds_most_exact_neighbours():
    bank, queries = _unit(4000, 16, 2), _unit(50, 16, 3)
    _, ids = search(build_index(bank, "ivf", nlist=32, nprobe=8), queries, 5)
    _, want = brute_force_topk(bank, queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, want)])
    assert recall > 0.8


def test_top_k_above_threshold_keeps_order_and_may_keep_none():
    scores = np.array([[0.9, 0.3, 0.2], [0.25, 0.1, -1.0]], np.float32)
    ids = np.array([[4, 1, 7], [2, 0, -1]])
    assert top_k_above(scores, ids, 0.271) == [[(4, pytest.approx(0.9)), (1, pytest.approx(0.3))], []]


def test_search_with_k_larger_than_bank():
    scores, ids = search(build_index(_unit(3, 8, 4), "flat"), _unit(2, 8, 5), 20)
    assert ids.shape == (2, 3)


def test_unknown_backend_is_named():
    with pytest.raises(CaptionerError, match="unknown caption backend 'gpt'"):
        get_captioner("gpt")
