"""EASE's closed form for the CVAE's item-item branch, and the validation arrays blends score on.

Why: the jointly trained branch B (see `layers.ItemItemBranch`) is fitted through the
multinomial likelihood on dropped-out input, which is not the least-squares problem EASE
(Steck, 2019) solves exactly. The two rank differently, and on ML-100K's weak split the
closed form alone beats the trained CVAE (test NDCG@10 0.415 vs 0.379) while the sum beats
both (0.425). Both terms are linear in the history x, so the sum is one matrix:

    logits = Decoder(z, c) + x · (B_trained + α · B_ease(λ))

    B_ease(λ) = I − P · diagMat(1 / diag(P)),  P = (XᵀX + λI + p/(1−p) · diagMat(XᵀX))⁻¹

with X the training users' inputs x and p EDLAE's dropout emphasis (0: EASE itself;
`model.ease.ease_from_gram`). `training.linear_blend` chooses (λ, p, α); the result is
written into the branch's weights, so the export, serving and candidates need nothing new,
and `generate` is unchanged (x = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.metrics import accuracy_metrics, hits_matrix, metric_cutoff
from recsys_cvae.model.ease import ease_from_gram
from recsys_cvae.ranking import top_unseen
from recsys_cvae.spec import TARGETS, FeatureSpec
from recsys_cvae.training.dataset import make_dataset

# Validation users scored per blend; more only costs memory (users × items floats).
MAX_VALIDATION_USERS = 20_000


def gram_matrix(
    model: Any, spec: FeatureSpec, split: str | Sequence[str], batch_size: int,
    fold_targets: bool = False, hold_out: float = 0.0,
) -> np.ndarray:
    """XᵀX `[num_items, num_items]` float64 of the model's input x over `split`'s users (or
    several splits', with their targets as input, or without a held-out share of their
    history: `make_dataset(fold_targets=..., hold_out=...)`).

    Accumulated batch by batch: X itself (users × items) is never held.
    """
    gram = np.zeros((spec.num_items, spec.num_items))
    for batch in make_dataset(spec, split, batch_size, fold_targets=fold_targets,
                              hold_out=hold_out):
        x = model.history_input(batch)
        gram += tf.matmul(x, x, transpose_a=True).numpy()
    return gram


def validation_arrays(
    model: Any, spec: FeatureSpec, split: str, batch_size: int, hold_out: float = 0.0,
    max_users: int = MAX_VALIDATION_USERS,
) -> tuple[np.ndarray, np.ndarray, list[set[int]]]:
    """(current logits, inputs x, held-out item indices) of `split`'s first `max_users` users
    with targets: the validation users', or a held-out share of the training users' history
    (`make_dataset(hold_out=...)`)."""
    index = {item: i for i, item in enumerate(model.item_ids)}
    logits, inputs, truth = [], [], []
    scored = 0
    for batch in make_dataset(spec, split, batch_size, hold_out=hold_out):
        targets = [{index[t.decode()] for t in row if t and t.decode() in index}
                   for row in batch[TARGETS].numpy()]
        keep = np.array([bool(t) for t in targets])
        keep &= np.cumsum(keep) <= max_users - scored
        if not keep.any():
            continue
        logits.append(model.recommend_logits(batch).numpy()[keep])
        inputs.append(model.history_input(batch).numpy()[keep])
        truth += [t for t in targets if t]
        scored += int(keep.sum())
        if scored >= max_users:
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
