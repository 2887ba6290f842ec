"""Metrics by hand on 2-3 users, cross-checked against scikit-learn, and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys_cvae import metrics as M
from recsys_cvae.evaluation import stats as St

LOG2_3 = math.log2(3)

# Two users, lists of 3. User 0: hits at ranks 1 and 3, |relevant| = 2.
# User 1: hit at rank 2, |relevant| = 4.
HITS = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
NUM_RELEVANT = np.array([2, 4])


def test_accuracy_metrics_by_hand():
    m = M.accuracy_metrics(HITS, NUM_RELEVANT, ks=[2, 3])
    np.testing.assert_allclose(m["recall@3"], [2 / 2, 1 / 4])
    np.testing.assert_allclose(m["nrecall@3"], [2 / 2, 1 / 3])  # / min(3, |relevant|)
    np.testing.assert_allclose(m["precision@2"], [1 / 2, 1 / 2])
    np.testing.assert_allclose(m["hitrate@2"], [1.0, 1.0])
    # ndcg@3 user 0: dcg = 1 + 1/log2(4) = 1.5; ideal = 1 + 1/log2(3).
    # user 1: dcg = 1/log2(3); ideal = 1 + 1/log2(3) + 1/2 (three slots, 4 relevant).
    np.testing.assert_allclose(
        m["ndcg@3"], [1.5 / (1 + 1 / LOG2_3), (1 / LOG2_3) / (1.5 + 1 / LOG2_3)]
    )
    # map@3 user 0: (P@1 · 1 + P@3 · 1) / min(3, 2) = (1 + 2/3) / 2; user 1: (1/2) / 3.
    np.testing.assert_allclose(m["map@3"], [(1 + 2 / 3) / 2, 0.5 / 3])
    np.testing.assert_allclose(m["mrr"], [1.0, 0.5])


def test_k_beyond_list_length_pads_with_misses():
    m = M.accuracy_metrics(HITS, NUM_RELEVANT, ks=[5])
    np.testing.assert_allclose(m["precision@5"], [2 / 5, 1 / 5])
    np.testing.assert_allclose(m["nrecall@5"], [1.0, 1 / 4])


def test_vectorised_hits_match_python_hits():
    rng = np.random.default_rng(1)
    num_items = 30
    truth = [set(rng.choice(num_items, size=4, replace=False).tolist()) for _ in range(20)]
    ranked = np.stack([rng.permutation(num_items)[:10] for _ in range(20)])
    ranked[3, 7:] = -1  # a short list
    keys = np.unique([u * num_items + i for u, t in enumerate(truth) for i in t])
    fast = M.hits_from_index(ranked, np.arange(20), keys, num_items)
    slow = M.hits_matrix([[i for i in row if i >= 0] for row in ranked], truth)
    np.testing.assert_array_equal(fast[:, : slow.shape[1]], slow)


def test_ndcg_matches_sklearn_on_random_rankings():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    num_items, k = 40, 10
    relevance = (rng.random((25, num_items)) < 0.15).astype(float)
    relevance[relevance.sum(axis=1) == 0, 0] = 1.0
    scores = rng.random((25, num_items))
    order = np.argsort(-scores, axis=1)
    hits = np.take_along_axis(relevance, order, axis=1)
    ours = M.ndcg_at_k(hits, relevance.sum(axis=1).astype(int), k)
    theirs = [sklearn_metrics.ndcg_score(relevance[[u]], scores[[u]], k=k) for u in range(25)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def test_map_matches_sklearn_average_precision_when_k_covers_everything():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    relevance = np.array([[1, 0, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0]], dtype=float)
    scores = rng.random(relevance.shape)
    hits = np.take_along_axis(relevance, np.argsort(-scores, axis=1), axis=1)
    ours = M.map_at_k(hits, relevance.sum(axis=1).astype(int), k=6)
    theirs = [sklearn_metrics.average_precision_score(relevance[u], scores[u]) for u in range(2)]
    np.testing.assert_allclose(ours, theirs)


def test_beyond_accuracy_by_hand():
    # Counts of 4 items over 3 training users: item 0 in all, 3 in none.
    information, percentile = M.item_popularity_stats(np.array([3, 1, 1, 0]), num_users=3)
    np.testing.assert_allclose(information, -np.log2(np.array([4, 2, 2, 1]) / 4))
    # Sorted counts 0,1,1,3: item 0 has 3 below -> 100; items 1, 2 tie (1 below, + half of
    # the other tie) -> 100 * 1.5 / 3 = 50; item 3 -> 0.
    np.testing.assert_allclose(percentile, [100, 50, 50, 0])
    ranked = np.array([[0, 1], [3, -1]])
    np.testing.assert_allclose(M.mean_item_value(ranked, percentile, 2), [75, 0])
    exposure = M.exposure_counts(ranked, 4, 2)
    np.testing.assert_array_equal(exposure, [1, 1, 0, 1])
    assert M.coverage(exposure) == 0.75
    assert M.gini(np.array([1, 1, 1, 1])) == pytest.approx(0.0)
    assert M.gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)  # (n - 1) / n
    # Categories: items 0 and 1 share one of two genres, item 2 is orthogonal to both.
    categories = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=float)
    ild = M.intra_list_diversity(np.array([[0, 1, -1], [0, 2, 3]]), categories, 3)
    # user 0: one pair, 1 - 1/sqrt(2); user 1: three pairs, all orthogonal -> 1.
    np.testing.assert_allclose(ild, [1 - 1 / math.sqrt(2), 1.0], rtol=1e-6)


def test_poisson_weights_are_deterministic_per_user_and_mean_one():
    hashes = St.user_hashes([f"u{i}" for i in range(20000)])
    weights = St.poisson_weights(hashes, 50, seed=3)
    assert weights.shape == (50, 20000)
    assert weights.mean() == pytest.approx(1.0, abs=0.01)
    assert weights.var() == pytest.approx(1.0, abs=0.02)
    # Order and batching do not matter: the weights of a user depend on its id only.
    np.testing.assert_array_equal(St.poisson_weights(hashes[::-1], 50, 3), weights[:, ::-1])
    assert not np.array_equal(St.poisson_weights(hashes, 50, 4), weights)


def test_bootstrap_interval_covers_the_mean_and_merges_like_one_pass():
    rng = np.random.default_rng(0)
    values = rng.random((4000, 2))
    hashes = St.user_hashes([f"u{i}" for i in range(4000)])
    whole = St.MeanAccumulator.empty(["a", "b"], 100)
    whole.add(values, St.poisson_weights(hashes, 100))
    parts = St.MeanAccumulator.empty(["a", "b"], 100)
    for rows in (slice(0, 1000), slice(1000, 4000)):
        part = St.MeanAccumulator.empty(["a", "b"], 100)
        part.add(values[rows], St.poisson_weights(hashes[rows], 100))
        parts.merge(part)
    np.testing.assert_allclose(parts.boot_sums, whole.boot_sums)
    low, high = whole.intervals()["a"]
    assert low < values[:, 0].mean() < high
    # Standard error of a U(0,1) mean over 4000 users is 0.0046: the interval is ~±0.009.
    assert 0.01 < high - low < 0.03


def test_paired_test_detects_a_consistent_small_gain_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.random((3000, 1))
    hashes = St.user_hashes([f"u{i}" for i in range(3000)])
    weights = St.poisson_weights(hashes, 200)
    a, b, c = (St.MeanAccumulator.empty(["m"], 200) for _ in range(3))
    a.add(base + 0.01, weights)  # always 0.01 better: unpaired CIs overlap, paired do not
    b.add(base, weights)
    c.add(base + rng.normal(0, 0.01, base.shape), weights)  # noise around b
    better = St.paired_test(a, b, "m")
    assert better["difference"] == pytest.approx(0.01)
    assert better["p_value"] <= 0.01 and better["ci"][0] > 0
    noise = St.paired_test(c, b, "m")
    assert noise["p_value"] > 0.05


def test_mean_item_values_for_several_k_equal_one_k_at_a_time():
    rng = np.random.default_rng(3)
    ranked = rng.integers(0, 8, size=(5, 6))
    ranked[1, 2:] = -1
    values = rng.random(8)
    many = M.mean_item_values(ranked, values, [1, 3, 10])
    for k in (1, 3, 10):
        np.testing.assert_allclose(many[k], M.mean_item_value(ranked, values, k))
