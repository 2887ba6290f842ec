"""Folds EASE's closed form into the CVAE's item-item branch after training, weighted on validation.

Why: the jointly trained branch B (see `layers.ItemItemBranch`) is fitted through the
multinomial likelihood on dropped-out input, which is not the least-squares problem EASE
(Steck, 2019) solves exactly. The two rank differently, and on ML-100K's weak split the
closed form alone beats the trained CVAE (test NDCG@10 0.415 vs 0.379) while the sum beats
both (0.425). Both terms are linear in the history x, so the sum is one matrix:

    logits = Decoder(z, c) + x · B_trained + α · x · B_ease(λ)
           = Decoder(z, c) + x · (B_trained + α · B_ease(λ))

    B_ease(λ) = I − P · diagMat(1 / diag(P)),  P = (XᵀX + λI + p/(1−p) · diagMat(XᵀX))⁻¹

with X the training users' inputs x and p EDLAE's dropout emphasis (0: EASE itself;
`model.ease.ease_from_gram`). (λ, p, α) is chosen on the validation users'
`evaluate.selection_metric` (NDCG@10 by default; α = 0, "keep the trained branch", is always a
candidate, so the blend never makes the validation score worse). The result is written into
the branch's weights: the export, serving and candidates need nothing new, and `generate` is
unchanged (x = 0).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.metrics import accuracy_metrics, hits_matrix, metric_cutoff
from recsys_cvae.model.ease import ease_from_gram
from recsys_cvae.ranking import top_unseen
from recsys_cvae.spec import TARGETS, FeatureSpec
from recsys_cvae.training.dataset import make_dataset

log = logging.getLogger(__name__)

# Validation users scored per blend; more only costs memory (users × items floats).
MAX_VALIDATION_USERS = 20_000


def gram_matrix(
    model: Any, spec: FeatureSpec, split: str | Sequence[str], batch_size: int,
    fold_targets: bool = False,
) -> np.ndarray:
    """XᵀX `[num_items, num_items]` float64 of the model's input x over `split`'s users (or
    several splits', with their targets as input: `make_dataset(fold_targets=...)`).

    Accumulated batch by batch: X itself (users × items) is never held.
    """
    gram = np.zeros((spec.num_items, spec.num_items))
    for batch in make_dataset(spec, split, batch_size, fold_targets=fold_targets):
        x = model.history_input(batch)
        gram += tf.matmul(x, x, transpose_a=True).numpy()
    return gram


def validation_arrays(
    model: Any, spec: FeatureSpec, split: str, batch_size: int
) -> tuple[np.ndarray, np.ndarray, list[set[int]]]:
    """(current logits, inputs x, held-out item indices) of the validation users with targets."""
    index = {item: i for i, item in enumerate(model.item_ids)}
    logits, inputs, truth = [], [], []
    scored = 0
    for batch in make_dataset(spec, split, batch_size):
        targets = [{index[t.decode()] for t in row if t and t.decode() in index}
                   for row in batch[TARGETS].numpy()]
        keep = np.array([bool(t) for t in targets])
        if not keep.any():
            continue
        logits.append(model.recommend_logits(batch).numpy()[keep])
        inputs.append(model.history_input(batch).numpy()[keep])
        truth += [t for t in targets if t]
        scored += int(keep.sum())
        if scored >= MAX_VALIDATION_USERS:
            break
    if not truth:
        return np.zeros((0, spec.num_items)), np.zeros((0, spec.num_items)), []
    return np.concatenate(logits), np.concatenate(inputs), truth


def validation_score(
    scores: np.ndarray, seen: np.ndarray, truth: Sequence[set[int]], metric: str
) -> float:
    """Mean `metric` (e.g. `ndcg@10`) of `scores` `[users, items]` with `seen` items excluded."""
    k = metric_cutoff(metric)
    order, _ = top_unseen(scores, seen, k)  # -1 (no item) past a short row's end
    hits = hits_matrix(order.tolist(), truth)
    relevant = np.array([len(t) for t in truth], dtype=np.int64)
    return float(accuracy_metrics(hits, relevant, [k])[metric].mean())


def blend_closed_form(
    model: Any,
    spec: FeatureSpec,
    train_split: str,
    validation_split: str,
    batch_size: int,
    lambdas: Sequence[float],
    weights: Sequence[float],
    metric: str,
    dropouts: Sequence[float] = (0.0,),
) -> dict[str, Any]:
    """Adds α · B_ease(λ, p) to the model's item-item branch for the best (λ, p, α) on
    validation.

    Returns what was chosen and the validation `metric` before and after
    (`validation_<metric>_before`, `validation_<metric>`; written into
    `training_metrics.json` by `train`). Leaves the model untouched when nothing helps.
    """
    branch = model.item_item
    logits, inputs, truth = validation_arrays(model, spec, validation_split, batch_size)
    if branch is None or not truth or not lambdas:
        return {"alpha": 0.0, "l2": None, "dropout": 0.0}
    seen = inputs > 0
    key = f"validation_{metric}"
    before = validation_score(logits, seen, truth, metric)
    best = {"alpha": 0.0, "l2": None, "dropout": 0.0, f"{key}_before": before, key: before}
    best_matrix = None
    gram = gram_matrix(model, spec, train_split, batch_size)
    for l2, dropout in itertools.product(lambdas, dropouts):
        closed_form = ease_from_gram(gram, l2, dropout)
        linear_scores = inputs @ closed_form
        for alpha in weights:
            if alpha <= 0:
                continue
            value = validation_score(logits + alpha * linear_scores, seen, truth, metric)
            if value > best[key]:
                best.update(alpha=float(alpha), l2=float(l2), dropout=float(dropout),
                            **{key: value})
                best_matrix = closed_form
    if best_matrix is not None:
        add_to_branch(branch, best["alpha"] * best_matrix)
    log.info(
        "item-item branch: + %.3g × EASE(λ=%s, p=%g); validation %s %.4f → %.4f",
        best["alpha"], best["l2"], best["dropout"], metric, before, best[key],
    )
    return best


def add_ease(
    model: Any, gram: np.ndarray, l2: float, alpha: float, dropout: float = 0.0
) -> None:
    """Adds α · EASE(λ, p) of `gram` to the item-item branch: a (λ, p, α) chosen elsewhere
    (the serving refit reuses its protocol model's choice on all the data)."""
    add_to_branch(model.item_item, alpha * ease_from_gram(gram, l2, dropout))


def add_to_branch(branch: Any, matrix: np.ndarray) -> None:
    """B += `matrix` in the branch's float32 weights (the EASE and low-pass blends)."""
    trained = branch.weights_matrix.numpy()
    branch.weights_matrix.assign((trained + matrix).astype(np.float32))
