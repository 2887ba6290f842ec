"""Folds the item graph's low-pass filter into the CVAE's item-item branch.

Why: after the EASE blend (`training.ease_blend`) the branch holds exact item-to-item
co-occurrence; the low-pass filter S (`model.low_pass`) adds the catalogue's few broad
directions of taste, which on ML-100K lifted EASE's own ranking by 2–3%. Linear in x like B:

    logits = Decoder(z, c) + x · (B_trained + α · B_ease) + γ · x · S(rank, β)

The filter's (rank, β) and its weight relative to EASE are chosen on a fold-in slice of the
training users (`training.fold_in_slice`), where there are ten times the validation users:
chosen on ~85 validation users the filter gained 1.0 % over EASE on the deployment benchmark's
split, chosen on the slice 2.7 % (NumPy, seeds 0–5). γ = α × that relative weight, α being
what the validation users chose for EASE against the CVAE's logits. Relative weights are
tried as multiples of the ratio of EASE's score spread to x·S's (per-user standard
deviations, averaged), so one grid serves any catalogue size; 0, "no filter", is always a
candidate. The serving refit reuses (rank, β, γ, shape) on all the data (`add_low_pass`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.model.ease import ease_from_gram
from recsys_cvae.model.low_pass import cosine_taper, low_pass_factors, low_pass_from_gram
from recsys_cvae.spec import FeatureSpec
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.ease_blend import add_to_branch, validation_arrays, validation_score
from recsys_cvae.training.fold_in_slice import fold_in_slice

log = logging.getLogger(__name__)

# The choice, as `train` returns it inside `linear_blend` and the refit reads it back.
CHOICE = ("low_pass_rank", "low_pass_exponent", "low_pass_weight", "low_pass_shape")


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
    ease_choice: dict[str, Any],
    shape: str = "cosine",
) -> dict[str, Any]:
    """Adds γ · S(rank, β) to the model's item-item branch; returns the choice (`CHOICE`;
    weight 0 = none), the fold-in slice's `metric` with EASE alone and with the filter
    (`fold_in_<metric>_ease`, `fold_in_<metric>_low_pass`), and the validation `metric`
    before and after (`validation_<metric>_low_pass_before`, `..._low_pass`), for the record.

    The filter's shape and its weight relative to EASE's scores are chosen on a fold-in slice
    of the training users (`training.fold_in_slice`: ten times the validation users), against
    EASE at the (λ, p) `ease_choice` holds; γ is that relative weight times EASE's blend
    weight α, so the filter keeps its share of the linear term the validation users chose
    for the CVAE. No filter without an EASE blend (α = 0): its weight is set against EASE's.
    """
    none = {"low_pass_rank": None, "low_pass_exponent": None, "low_pass_weight": 0.0,
            "low_pass_shape": shape}
    branch = model.item_item
    ranks = candidate_ranks(ranks, spec.splits[train_split].users, spec.num_items)
    alpha = float(ease_choice.get("alpha") or 0.0)
    if branch is None or not ranks or not weights or alpha <= 0:
        return none
    data = fold_in_slice(model, spec, train_split, batch_size)
    if not data.truth:
        return none
    seen = data.inputs > 0
    ease_scores = data.inputs @ ease_from_gram(data.gram, ease_choice["l2"],
                                               ease_choice.get("dropout", 0.0))
    slice_key = f"fold_in_{metric}"
    best_value = validation_score(ease_scores, seen, data.truth, metric)
    scores = {f"{slice_key}_ease": best_value, f"{slice_key}_low_pass": best_value}
    spread = float(np.mean(np.std(ease_scores, axis=1)))
    chosen = None
    for exponent in exponents:
        left, right = low_pass_factors(data.normalised_gram, data.degrees, max(ranks), exponent)
        projected = data.inputs @ left
        for rank in ranks:
            filtered = (projected[:, :rank] * _taper(shape, rank)) @ right[:rank]
            unit = spread / max(float(np.mean(np.std(filtered, axis=1))), 1e-12)
            for multiple in weights:
                if multiple <= 0:
                    continue
                value = validation_score(ease_scores + multiple * unit * filtered, seen,
                                         data.truth, metric)
                if value > best_value:
                    best_value, chosen = value, (float(exponent), int(rank), multiple * unit)
    if chosen is None:
        log.info("item-item branch: no low-pass filter (fold-in %s with EASE alone %.4f)",
                 metric, best_value)
        return {**none, **scores}
    exponent, rank, relative = chosen
    scores[f"{slice_key}_low_pass"] = best_value
    gram, degrees = normalised_gram(model, spec, train_split, batch_size)
    low_pass = low_pass_from_gram(gram, degrees, rank, exponent, shape == "cosine")
    weight = alpha * relative
    logits, inputs, truth = validation_arrays(model, spec, validation_split, batch_size)
    key = f"validation_{metric}_low_pass"
    if truth:
        seen = inputs > 0
        scores[f"{key}_before"] = validation_score(logits, seen, truth, metric)
        scores[key] = validation_score(logits + weight * (inputs @ low_pass), seen, truth, metric)
    add_to_branch(branch, weight * low_pass)
    log.info(
        "item-item branch: + %.3g × low-pass(%s, rank=%s, β=%s); fold-in %s with EASE %.4f → "
        "%.4f; validation %.4f → %.4f", weight, shape, rank, exponent, metric,
        scores[f"{slice_key}_ease"], best_value, scores.get(f"{key}_before", float("nan")),
        scores.get(key, float("nan")),
    )
    return {**none, "low_pass_rank": rank, "low_pass_exponent": exponent,
            "low_pass_weight": float(weight), **scores}


def _taper(shape: str, rank: int) -> np.ndarray:
    return cosine_taper(rank) if shape == "cosine" else np.ones(rank)


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
