"""The history-only baselines: popularity, item-kNN and EASE (Steck, 2019).

    X        [num_train_users, num_items] 0/1 training histories
    popularity   score_i = Σ_u X[u, i]
    item_knn     S = cosine(X[:, i], X[:, j]), zero diagonal, top `knn_neighbours` per item;
                 scores = x_user · S
    ease     B = I - P · diagMat(1 / diag(P)),  P = (XᵀX + λI)⁻¹,  scores = x_user · B

ItemKNN and EASE need a history, so users whose history is empty (all cold users) get
popularity from them. EASE's λ is chosen on validation (`select_ease`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from recsys_cvae.baselines.rankings import validation_score
from recsys_cvae.baselines.split_data import BaselineError, Scorer, SplitData, as_histories
from recsys_cvae.config import EvaluateConfig
from recsys_cvae.histories import Histories
from recsys_cvae.model.ease import ease_from_gram
from recsys_cvae.ranking import SharedScores


def popularity(train_history: Histories | np.ndarray) -> np.ndarray:
    """[num_items] interaction counts over the training users."""
    return as_histories(train_history).item_counts()


def popularity_scorer(global_scores: np.ndarray) -> Scorer:
    """Everyone gets the global counts [num_items]."""

    table = np.asarray(global_scores)[None, :]  # one object for every chunk: sorted once

    def score(data: SplitData, rows: slice) -> SharedScores:
        num_rows = len(range(data.history.shape[0])[rows])
        return SharedScores(table, np.zeros(num_rows, dtype=np.int64))

    return score


def ease_scorer(weights: np.ndarray, global_scores: np.ndarray) -> Scorer:
    """x_user · B [num_items, num_items]; popularity for users with an empty history."""

    def score(data: SplitData, rows: slice) -> np.ndarray:
        scores = data.history.dense(rows, np.float64) @ weights
        scores[data.history.lengths(rows) == 0] = global_scores
        return scores

    return score


def item_knn_weights(train_history: Histories | np.ndarray, neighbours: int) -> np.ndarray:
    """ItemKNN: cosine similarity between item columns of X [num_items, num_items], zero
    diagonal, keeping the `neighbours` largest per item (0 keeps all)."""
    history = as_histories(train_history)
    norms = np.sqrt(history.item_counts())
    similarity = history.gram()
    similarity /= np.outer(norms, norms).clip(min=1e-12)
    similarity[np.diag_indices_from(similarity)] = 0.0
    if 0 < neighbours < similarity.shape[0]:
        cut = np.partition(similarity, -neighbours, axis=0)[-neighbours]
        similarity[similarity < cut[None, :]] = 0.0
    return similarity


def ease_weights(train_history: Histories | np.ndarray, l2: float) -> np.ndarray:
    """EASE's item-item matrix B [num_items, num_items] with a zero diagonal (closed form)."""
    return ease_from_gram(as_histories(train_history).gram(), l2)


def select_ease(
    train: SplitData, validation: SplitData | None, items: Sequence[str], config: EvaluateConfig
) -> tuple[Scorer, dict[str, Any]]:
    """Fits EASE for every λ in config.ease_lambdas; keeps the best on validation (on a tie,
    the first λ)."""
    lambdas = list(config.ease_lambdas)
    if not lambdas:
        raise BaselineError("evaluate.ease_lambdas is empty; give at least one λ")
    global_scores = popularity(train.history)
    gram = train.history.gram()  # once for every λ
    if validation is None:
        weights = ease_from_gram(gram, lambdas[0])
        return ease_scorer(weights, global_scores), {"l2": lambdas[0], "tried": {}}
    tried: dict[str, float] = {}
    best: tuple[float, float, Scorer] | None = None
    for l2 in lambdas:
        scorer = ease_scorer(ease_from_gram(gram, l2), global_scores)
        value = validation_score(scorer, validation, items, config.selection_metric)
        tried[str(l2)] = value
        if best is None or value > best[0]:
            best = (value, l2, scorer)
    return best[2], {"l2": best[1], "selection_metric": config.selection_metric, "tried": tried}
