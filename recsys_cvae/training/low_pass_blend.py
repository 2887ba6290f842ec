"""Folds the item graph's low-pass filter into the CVAE's item-item branch, weighted on validation.

Why: after the EASE blend (`training.ease_blend`) the branch holds exact item-to-item
co-occurrence; the low-pass filter S (`model.low_pass`) adds the catalogue's few broad
directions of taste, which on ML-100K lifted EASE's own ranking by ~2%. Linear in x like B:

    logits = Decoder(z, c) + x · (B_trained + α · B_ease) + γ · x · S(rank, β)

(rank, β, γ) is chosen on the validation users' `evaluate.selection_metric`, after the EASE
blend (γ = 0, "no filter", is always a candidate, so validation never gets worse). γ is tried
as multiples of the ratio of the current scores' spread to x·S's (per-user standard
deviations, averaged), so one grid serves CVAE logits, EASE-dominated logits and any
catalogue size. The serving refit reuses (rank, β, γ) on all the data (`add_low_pass`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.model.low_pass import low_pass_factors, low_pass_from_gram
from recsys_cvae.spec import FeatureSpec
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.ease_blend import add_to_branch, validation_arrays, validation_score

log = logging.getLogger(__name__)

# The choice, as `train` returns it inside `linear_blend` and the refit reads it back.
CHOICE = ("low_pass_rank", "low_pass_exponent", "low_pass_weight")


def normalised_gram(
    model: Any, spec: FeatureSpec, split: str | Sequence[str], batch_size: int,
    fold_targets: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(Xᵀ·D_u⁻¹·X `[num_items, num_items]`, item degrees `[num_items]`), float64, of the
    model's input x over `split`'s users: each user's row weighted by 1 / its total, so
    heavy users do not set the item graph alone. Accumulated batch by batch."""
    gram = np.zeros((spec.num_items, spec.num_items))
    degrees = np.zeros(spec.num_items)
    for batch in make_dataset(spec, split, batch_size, fold_targets=fold_targets):
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


def blend_low_pass(
    model: Any,
    spec: FeatureSpec,
    train_split: str,
    validation_split: str,
    batch_size: int,
    ranks: Sequence[int],
    exponents: Sequence[float],
    weights: Sequence[float],
    metric: str,
) -> dict[str, Any]:
    """Adds γ · S(rank, β) to the model's item-item branch for the best (rank, β, γ) on
    validation; returns the choice (`CHOICE`; weight 0 = none) and the validation metric
    before and after (`validation_<metric>_low_pass_before`, `..._low_pass`)."""
    none = {"low_pass_rank": None, "low_pass_exponent": None, "low_pass_weight": 0.0}
    branch = model.item_item
    logits, inputs, truth = validation_arrays(model, spec, validation_split, batch_size)
    ranks = candidate_ranks(ranks, spec.splits[train_split].users, spec.num_items)
    if branch is None or not truth or not ranks or not weights:
        return none
    seen = inputs > 0
    key = f"validation_{metric}_low_pass"
    before = validation_score(logits, seen, truth, metric)
    best = {**none, f"{key}_before": before, key: before}
    best_factors, chosen_multiple = None, 0.0
    gram, degrees = normalised_gram(model, spec, train_split, batch_size)
    spread = float(np.mean(np.std(logits, axis=1)))
    for exponent in exponents:
        left, right = low_pass_factors(gram, degrees, max(ranks), exponent)
        projected = inputs @ left
        for rank in ranks:
            filtered = projected[:, :rank] @ right[:rank]
            unit = spread / max(float(np.mean(np.std(filtered, axis=1))), 1e-12)
            for multiple in weights:
                if multiple <= 0:
                    continue
                value = validation_score(logits + multiple * unit * filtered, seen, truth,
                                         metric)
                if value > best[key]:
                    best.update(low_pass_rank=int(rank), low_pass_exponent=float(exponent),
                                low_pass_weight=float(multiple * unit), **{key: value})
                    chosen_multiple = multiple
                    best_factors = left[:, :rank], right[:rank]
    if best_factors is not None:
        add_to_branch(branch, best["low_pass_weight"] * (best_factors[0] @ best_factors[1]))
    log.info(
        "item-item branch: + %.3g × low-pass(rank=%s, β=%s) (%g × the spread ratio); "
        "validation %s %.4f → %.4f", best["low_pass_weight"], best["low_pass_rank"],
        best["low_pass_exponent"], chosen_multiple, metric, before, best[key],
    )
    return best


def add_low_pass(
    model: Any, spec: FeatureSpec, split: str | Sequence[str], batch_size: int,
    fold_targets: bool, choice: dict[str, Any],
) -> None:
    """Adds γ · S(rank, β) of `split`'s users to the item-item branch at a (rank, β, γ) chosen
    elsewhere (the serving refit reuses its protocol model's choice on all the data)."""
    gram, degrees = normalised_gram(model, spec, split, batch_size, fold_targets)
    low_pass = low_pass_from_gram(gram, degrees, int(choice["low_pass_rank"]),
                                  choice["low_pass_exponent"])
    add_to_branch(model.item_item, choice["low_pass_weight"] * low_pass)
