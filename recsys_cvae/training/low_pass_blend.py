"""The low-pass filter's pieces for the item-item branch: the degree-normalised Gram, the ranks
worth trying, and the refit's re-add.

Why here: the filter S (`model.low_pass`) is the second part of the linear term
`training.linear_blend` chooses (its shape on a fold-in slice of the training users, its
weight on validation); the serving refit rebuilds it on all the data at the chosen
(rank, β, γ, shape) with `add_low_pass`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.model.low_pass import low_pass_from_gram
from recsys_cvae.spec import FeatureSpec
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.ease_blend import add_to_branch

# The choice, as `train` returns it inside `linear_blend` and the refit reads it back.
CHOICE = ("low_pass_rank", "low_pass_exponent", "low_pass_weight", "low_pass_shape")


def normalised_gram(
    model: Any, spec: FeatureSpec, split: str | Sequence[str], batch_size: int,
    fold_targets: bool = False, hold_out: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(Xᵀ·D_u⁻¹·X `[num_items, num_items]`, item degrees `[num_items]`), float64, of the
    model's input x over `split`'s users: each user's row weighted by 1 / its total, so
    heavy users do not set the item graph alone (`make_dataset` for `fold_targets` and
    `hold_out`). Accumulated batch by batch."""
    gram = np.zeros((spec.num_items, spec.num_items))
    degrees = np.zeros(spec.num_items)
    for batch in make_dataset(spec, split, batch_size, fold_targets=fold_targets,
                              hold_out=hold_out):
        x = model.history_input(batch)
        totals = tf.reduce_sum(x, axis=1, keepdims=True)
        scaled = x * tf.math.rsqrt(tf.maximum(totals, 1e-12))
        gram += tf.matmul(scaled, scaled, transpose_a=True).numpy()
        degrees += tf.reduce_sum(x, axis=0).numpy()
    return gram, degrees


def candidate_ranks(ranks: Sequence[int], num_users: int, num_items: int) -> list[int]:
    """The ranks worth trying on this data: below a quarter of min(users, items), where a
    low-pass filter still filters (ML-100K's best, 16–24, is ~1/50 of its 943 users)."""
    ceiling = min(num_users, num_items) / 4
    return [rank for rank in ranks if 0 < rank < ceiling]


def add_low_pass(
    model: Any, spec: FeatureSpec, split: str | Sequence[str], batch_size: int,
    fold_targets: bool, choice: dict[str, Any],
) -> None:
    """Adds γ · S(rank, β) of `split`'s users to the item-item branch at a (rank, β, γ) chosen
    elsewhere (the serving refit reuses its protocol model's choice on all the data)."""
    gram, degrees = normalised_gram(model, spec, split, batch_size, fold_targets)
    low_pass = low_pass_from_gram(gram, degrees, int(choice["low_pass_rank"]),
                                  choice["low_pass_exponent"],
                                  choice.get("low_pass_shape", "ideal") == "cosine")
    add_to_branch(model.item_item, choice["low_pass_weight"] * low_pass)
