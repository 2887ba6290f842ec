"""Ranking and beyond-accuracy metrics: one implementation for training callbacks, evaluation,
baselines, the streaming benchmark and the Beam job.

Every function returns one value per user (or, for catalogue-level metrics, exposure counts
that add up across batches), so callers can average, bootstrap or slice by segment without
re-implementing anything. Shapes:

    hits:          [num_users, K] float 0/1, is the item at rank r held out for the user
    num_relevant:  [num_users] int, how many held-out items the user has
    item_index:    [num_users, K] int, recommended items as vocabulary indices, best first;
                   -1 pads short lists and never matches

Definitions (binary relevance, rank r = 1..k):

    recall@k     hits in top k / |relevant|
    nrecall@k    hits in top k / min(k, |relevant|)   (Mult-VAE's normalised recall, max 1)
    precision@k  hits in top k / k
    hitrate@k    1 if any hit in top k
    ndcg@k       Σ_r hit_r / log2(r + 1)  /  the same for min(k, |relevant|) hits at the top
    map@k        Σ_r precision@r · hit_r  /  min(k, |relevant|)
    mrr          1 / rank of the first hit in the whole list (0 without one)
    novelty@k    mean over the top k of -log2 p(i), p(i) = (train users of i + 1) / (U + 1)
    pop_pct@k    mean over the top k of the item's popularity percentile in [0, 100]
    ild@k        mean over pairs in the top k of 1 - cosine(categories_i, categories_j)
    coverage@k   share of the catalogue in at least one user's top k    (from exposure)
    gini@k       Gini coefficient of how often each item is in a top k   (from exposure)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_KS = (5, 10, 20, 50, 100)
ACCURACY = ("recall", "nrecall", "ndcg", "precision", "map", "hitrate")


def hits_matrix(ranked: Sequence[Sequence], truth: Sequence[set]) -> np.ndarray:
    """[num_users, K] float 0/1 from Python lists of ids (small inputs: tests, callbacks)."""
    width = max((len(r) for r in ranked), default=0)
    hits = np.zeros((len(ranked), width), dtype=np.float64)
    for u, (row, relevant) in enumerate(zip(ranked, truth)):
        for r, item in enumerate(row):
            if item in relevant:
                hits[u, r] = 1.0
    return hits


def hits_from_index(
    item_index: np.ndarray, rows: np.ndarray, truth_keys: np.ndarray, num_items: int
) -> np.ndarray:
    """Vectorised hits for large batches.

    Args:
      item_index: [n, K] int vocabulary indices, -1 = padding.
      rows: [n] int, each user's row in the truth table.
      truth_keys: sorted int64 `row * num_items + item` of every held-out (row, item) pair.
      num_items: catalogue size.

    Returns:
      [n, K] float64 0/1.
    """
    if truth_keys.size == 0 or item_index.size == 0:
        return np.zeros(item_index.shape, dtype=np.float64)
    keys = rows.astype(np.int64)[:, None] * num_items + item_index.astype(np.int64)
    position = np.searchsorted(truth_keys, keys).clip(max=truth_keys.size - 1)
    return ((truth_keys[position] == keys) & (item_index >= 0)).astype(np.float64)


def _pad(hits: np.ndarray, k: int) -> np.ndarray:
    if hits.shape[1] >= k:
        return hits[:, :k]
    return np.pad(hits, ((0, 0), (0, k - hits.shape[1])))


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(
        numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0
    )


def recall_at_k(hits: np.ndarray, num_relevant: np.ndarray, k: int) -> np.ndarray:
    """Hits in the top k / |relevant|."""
    return _safe_divide(_pad(hits, k).sum(axis=1), num_relevant)


def normalized_recall_at_k(hits: np.ndarray, num_relevant: np.ndarray, k: int) -> np.ndarray:
    """Mult-VAE's recall: hits in the top k / min(k, |relevant|) (Liang et al., 2018, eq. 7).

    Dividing by min(k, |relevant|) keeps the maximum at 1 for users with more held-out items
    than k.
    """
    return _safe_divide(_pad(hits, k).sum(axis=1), np.minimum(k, num_relevant))


def precision_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    return _pad(hits, k).sum(axis=1) / float(k)


def hitrate_at_k(hits: np.ndarray, k: int) -> np.ndarray:
    return _pad(hits, k).any(axis=1).astype(np.float64)


def ndcg_at_k(hits: np.ndarray, num_relevant: np.ndarray, k: int) -> np.ndarray:
    """Binary-relevance NDCG@k with the 1/log2(rank + 1) discount."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (_pad(hits, k) * discounts).sum(axis=1)
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[np.minimum(k, num_relevant)]
    return _safe_divide(dcg, ideal)


def map_at_k(hits: np.ndarray, num_relevant: np.ndarray, k: int) -> np.ndarray:
    """Average precision over the top k, normalised by min(k, |relevant|)."""
    top = _pad(hits, k)
    precision_at_rank = np.cumsum(top, axis=1) / np.arange(1, k + 1)
    return _safe_divide((precision_at_rank * top).sum(axis=1), np.minimum(k, num_relevant))


def reciprocal_rank(hits: np.ndarray, k: int | None = None) -> np.ndarray:
    """1 / rank of the first hit (0 when none in the list, or in the top k when given)."""
    top = hits if k is None else hits[:, :k]
    if top.shape[1] == 0:
        return np.zeros(len(top))
    first = top.argmax(axis=1)
    return np.where(top.any(axis=1), 1.0 / (first + 1.0), 0.0)


def accuracy_metrics(
    hits: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-user `<metric>@k` for every metric in ACCURACY and every k, plus `mrr`."""
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(hits, num_relevant, k)
        out[f"nrecall@{k}"] = normalized_recall_at_k(hits, num_relevant, k)
        out[f"ndcg@{k}"] = ndcg_at_k(hits, num_relevant, k)
        out[f"precision@{k}"] = precision_at_k(hits, k)
        out[f"map@{k}"] = map_at_k(hits, num_relevant, k)
        out[f"hitrate@{k}"] = hitrate_at_k(hits, k)
    out["mrr"] = reciprocal_rank(hits)
    return out


def metric_cutoff(name: str) -> int:
    """k of a `<metric>@k` name (`ndcg@10` -> 10), for ranking just deep enough to score it.

    Raises ValueError naming the accepted forms for anything else (`mrr` included: every
    selection ranks to a cutoff)."""
    kind, _, cutoff = name.partition("@")
    if kind not in {"recall", "nrecall", "ndcg", "precision", "map", "hitrate"} or not (
        cutoff.isdigit() and int(cutoff) > 0
    ):
        raise ValueError(
            f"evaluate.selection_metric {name!r}: expected "
            f"<recall|nrecall|ndcg|precision|map|hitrate>@k, e.g. ndcg@10"
        )
    return int(cutoff)


def ranking_metrics(
    ranked: Sequence[Sequence], truth: Sequence[set], ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """accuracy_metrics from Python lists of ids. Users with an empty truth score 0."""
    hits = hits_matrix(ranked, truth)
    return accuracy_metrics(hits, np.array([len(t) for t in truth], dtype=np.int64), ks)


# ---- beyond accuracy ---------------------------------------------------------------------


def item_popularity_stats(counts: np.ndarray, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(self-information [num_items] in bits, popularity percentile [num_items] in [0, 100]).

    counts: [num_items] training users per item. The percentile of an item is the share of
    items strictly less popular than it plus half the ties, times 100, so the median item
    sits at 50 whatever the ties.
    """
    counts = np.asarray(counts, dtype=np.float64)
    information = -np.log2((counts + 1.0) / (num_users + 1.0))
    order = np.sort(counts)
    below = np.searchsorted(order, counts, side="left")
    ties = np.searchsorted(order, counts, side="right") - below
    percentile = 100.0 * (below + 0.5 * (ties - 1)) / max(len(counts) - 1, 1)
    return information, percentile


def mean_item_value(item_index: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Per-user mean of `values[item]` [num_items] over the (non-padding) top k."""
    top = item_index[:, :k]
    valid = top >= 0
    gathered = np.where(valid, values[np.where(valid, top, 0)], 0.0)
    return _safe_divide(gathered.sum(axis=1), valid.sum(axis=1))


def mean_item_values(
    item_index: np.ndarray, values: np.ndarray, ks: Sequence[int]
) -> dict[int, np.ndarray]:
    """`mean_item_value` for several k with one gather and one cumulative sum."""
    width = max(ks)
    top = item_index[:, :width]
    valid = top >= 0
    gathered = np.where(valid, values[np.where(valid, top, 0)], 0.0)
    sums, counts = np.cumsum(gathered, axis=1), np.cumsum(valid, axis=1)
    out = {}
    for k in ks:
        column = min(k, top.shape[1]) - 1
        if column < 0:
            out[k] = np.zeros(len(top))
        else:
            out[k] = _safe_divide(sums[:, column], counts[:, column])
    return out


def intra_list_diversity(item_index: np.ndarray, categories: np.ndarray, k: int) -> np.ndarray:
    """Per-user mean pairwise 1 - cosine of the category vectors of the top k.

    categories: [num_items, num_categories] 0/1 (e.g. MovieLens genres). Items without any
    category count as orthogonal to everything. Users with fewer than two items score 0.
    """
    top = item_index[:, :k]
    valid = top >= 0
    vectors = categories[np.where(valid, top, 0)].astype(np.float32)  # [n, k, c]
    norms = np.linalg.norm(vectors, axis=2, keepdims=True)
    vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    vectors *= valid[:, :, None]
    similarity = np.einsum("nkc,njc->nkj", vectors, vectors)  # [n, k, k]
    count = valid.sum(axis=1).astype(np.float64)
    pairs = count * (count - 1)
    off_diagonal = similarity.sum(axis=(1, 2)) - np.einsum("nkk->n", similarity)
    return _safe_divide(pairs - off_diagonal, pairs)


def exposure_counts(item_index: np.ndarray, num_items: int, k: int) -> np.ndarray:
    """[num_items] int64: how many users have each item in their top k (adds over batches)."""
    top = item_index[:, :k]
    return np.bincount(top[top >= 0].ravel(), minlength=num_items).astype(np.int64)


def coverage(exposure: np.ndarray) -> float:
    """Share of the catalogue recommended to at least one user."""
    return float((exposure > 0).mean()) if exposure.size else 0.0


def gini(exposure: np.ndarray) -> float:
    """Gini coefficient of exposure: 0 when every item is shown equally often, → 1 when a
    few items take all the slots (items never shown count as zeros)."""
    values = np.sort(np.asarray(exposure, dtype=np.float64))
    n, total = values.size, values.sum()
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(((2 * ranks - n - 1) * values).sum() / (n * total))


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (0..1) of two distributions over the same support
    (output monitoring's item drift, synthetic data's per-segment fidelity)."""
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def catalogue_coverage(ranked: Sequence[Sequence], num_items: int, k: int) -> float:
    """Share of the catalogue that appears in at least one user's top k (from id lists)."""
    seen = {item for row in ranked for item in list(row)[:k] if item is not None}
    return len(seen) / num_items if num_items else 0.0


# ---- small inputs ----------------------------------------------------------------------


def score_rankings(
    ranked_by_user: Mapping[str, Sequence[str]],
    truth: Mapping[str, set[str]],
    ks: Sequence[int],
    num_items: int,
) -> dict[str, float]:
    """Mean accuracy metrics and coverage over the users in `truth` from Python lists (small
    inputs: baseline tuning, tests). Users of `truth` absent from `ranked_by_user` score 0."""
    users = sorted(truth)
    ranked = [list(ranked_by_user.get(u, ())) for u in users]
    per_user = ranking_metrics(ranked, [truth[u] for u in users], ks)
    result = {name: float(np.mean(v)) if len(v) else 0.0 for name, v in per_user.items()}
    for k in ks:
        result[f"coverage@{k}"] = catalogue_coverage(ranked, num_items, k)
    result["users"] = len(users)
    result["users_missing"] = sum(1 for u in users if u not in ranked_by_user)
    return result
