"""Folds a closed-form linear term into the CVAE's item-item branch after training.

Why: the branch B (`layers.ItemItemBranch`) is trained through the multinomial likelihood;
EASE's closed form (`model.ease`) ranks warm users better, and the item graph's low-pass
filter (`model.low_pass`) adds the catalogue's few broad directions of taste on top. All are
linear in the history x, so the served logits stay one matrix product:

    logits = Decoder(z, c) + x · B_trained + α · x · (B_ease(λ, p) + r · S(rank, β))

The choice is made on a fold-in slice: the protocol model trains without a share of each
training user's history (`model.linear_blend_held_out_share`, `make_dataset(hold_out=)`),
and those items are what the slice's users must rank from the rest, exactly what a served
warm user asks. The term's shape (λ, p, rank, β, r) is chosen there with the closed forms
alone; its weight α against the CVAE's logits on the slice and the validation users
together (α = 0, "keep the trained branch", is always a candidate). The ~85 validation
users of ML-100K alone were too few: with NumPy on the deployment split (seeds 0–5), EASE +
filter chosen on them ranked 1.010 × EASE, chosen on a slice 1.027 ×, with hindsight
1.030 ×; and on split seed 4 they picked no EASE at all, and the served model ranked
0.926 × EASE.

The serving refit reuses the choice on all the data (`fit._blend` with `fixed`): it records
α, λ, p and the filter's weight γ = α · r, which is what `add_ease` and `add_low_pass` take.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any

import numpy as np

from recsys_cvae.config import ModelConfig
from recsys_cvae.model.ease import ease_from_gram
from recsys_cvae.model.low_pass import cosine_taper, low_pass_factors, low_pass_from_gram
from recsys_cvae.spec import FeatureSpec
from recsys_cvae.training.ease_blend import (
    add_to_branch,
    gram_matrix,
    validation_arrays,
    validation_score,
)
from recsys_cvae.training.low_pass_blend import candidate_ranks, normalised_gram

log = logging.getLogger(__name__)

# Slice users scored: at most this many, and at most MAX_SLICE_CELLS users × items (their
# logits and inputs are held as float32 while every α is tried).
MAX_SLICE_USERS = 20_000
MAX_SLICE_CELLS = 25_000_000

# What a run without a linear term records.
NONE = {"alpha": 0.0, "l2": None, "dropout": 0.0, "low_pass_rank": None,
        "low_pass_exponent": None, "low_pass_weight": 0.0}


@dataclasses.dataclass
class FoldInSlice:
    """The slice: the kept part of every training user, and the scored users.

    Attributes:
      gram: XᵀX `[items, items]` float64 of the kept parts (EASE's input).
      normalised_gram, degrees: Xᵀ·D_u⁻¹·X and the item degrees of the kept parts (the
        low-pass filter's input, `low_pass_blend.normalised_gram`).
      logits: the CVAE's logits `[users, items]` of the scored users, from their kept parts.
      inputs: the scored users' kept parts x `[users, items]`.
      truth: each scored user's held-out item indices.
    """

    gram: np.ndarray
    normalised_gram: np.ndarray
    degrees: np.ndarray
    logits: np.ndarray
    inputs: np.ndarray
    truth: list[set[int]]


def fold_in_slice(
    model: Any, spec: FeatureSpec, split: str, batch_size: int, share: float
) -> FoldInSlice:
    """`split`'s users with `share` of their history held out (`make_dataset(hold_out=)`)."""
    users = max(1, min(MAX_SLICE_USERS, MAX_SLICE_CELLS // max(spec.num_items, 1)))
    logits, inputs, truth = validation_arrays(model, spec, split, batch_size, share, users)
    gram = gram_matrix(model, spec, split, batch_size, hold_out=share)
    normalised, degrees = normalised_gram(model, spec, split, batch_size, hold_out=share)
    return FoldInSlice(gram, normalised, degrees, logits, inputs, truth)


def blend_linear_term(
    model: Any, spec: FeatureSpec, train_split: str, validation_split: str, batch_size: int,
    settings: ModelConfig, metric: str, held_out_share: float,
) -> dict[str, Any]:
    """Adds α · (B_ease + r · S) to the model's item-item branch, chosen on the kept parts and
    built from every training interaction (as the serving refit builds it from all); returns
    the choice (`NONE`'s keys, plus `low_pass_shape`) and, for the record, the slice's
    `metric` for EASE alone and with the filter (`fold_in_<metric>_ease`,
    `fold_in_<metric>_low_pass`) and the slice's and validation users' `metric` before and
    after (`blend_<metric>_before`, `blend_<metric>`, `validation_<metric>_before`,
    `validation_<metric>`). Leaves the model untouched when the term does not help."""
    none = {**NONE, "low_pass_shape": settings.low_pass_shape}
    if model.item_item is None or not settings.linear_blend_lambdas or held_out_share <= 0:
        return none
    held = fold_in_slice(model, spec, train_split, batch_size, held_out_share)
    logits, inputs, truth = validation_arrays(model, spec, validation_split, batch_size)
    if not held.truth:
        log.info("item-item branch: no linear term (no training user has items to hold out)")
        return none
    shape = choose_shape(held, spec.splits[train_split].users, settings, metric)

    tapered = settings.low_pass_shape == "cosine"
    kept = linear_term(held.gram, held.normalised_gram, held.degrees, shape, tapered)
    # What the model keeps: the same term over every training interaction, the held-out
    # ones included (the validation users are scored with it; the slice's users cannot be).
    full_gram, (full_normalised, full_degrees) = (
        gram_matrix(model, spec, train_split, batch_size),
        normalised_gram(model, spec, train_split, batch_size))
    linear = linear_term(full_gram, full_normalised, full_degrees, shape, tapered)
    # No validation users: `validation_arrays` returns `[0, items]` arrays, which join as none.
    both_logits = np.concatenate([held.logits, logits])
    both_inputs = np.concatenate([held.inputs, inputs])
    both_truth = held.truth + truth
    seen = both_inputs > 0
    linear_scores = np.concatenate([held.inputs @ kept, inputs @ linear])
    before = validation_score(both_logits, seen, both_truth, metric)
    best_alpha, best_value = 0.0, before
    for alpha in settings.linear_blend_weights:
        if alpha > 0:
            value = validation_score(both_logits + alpha * linear_scores, seen, both_truth,
                                     metric)
            if value > best_value:
                best_alpha, best_value = float(alpha), value
    record = {f"fold_in_{metric}_ease": shape[f"fold_in_{metric}_ease"],
              f"fold_in_{metric}_low_pass": shape[f"fold_in_{metric}_low_pass"],
              f"blend_{metric}_before": before, f"blend_{metric}": best_value}
    if truth:
        split = len(held.truth)
        record[f"validation_{metric}_before"] = validation_score(
            logits, seen[split:], truth, metric)
        record[f"validation_{metric}"] = validation_score(
            logits + best_alpha * linear_scores[split:], seen[split:], truth, metric)
    log.info(
        "item-item branch: + %.3g × (EASE(λ=%s, p=%g) + %.3g × low-pass(rank=%s, β=%s)); "
        "fold-in %s %.4f (EASE alone %.4f); with the CVAE on %d users %.4f → %.4f",
        best_alpha, shape["l2"], shape["dropout"], shape["low_pass_relative"],
        shape["low_pass_rank"], shape["low_pass_exponent"], metric,
        shape[f"fold_in_{metric}_low_pass"], shape[f"fold_in_{metric}_ease"],
        len(both_truth), before, best_value,
    )
    if best_alpha == 0.0:
        return {**none, **record}
    add_to_branch(model.item_item, best_alpha * linear)
    filtered = bool(shape["low_pass_relative"])
    return {
        **none, **record, "alpha": best_alpha, "l2": shape["l2"], "dropout": shape["dropout"],
        "low_pass_rank": shape["low_pass_rank"] if filtered else None,
        "low_pass_exponent": shape["low_pass_exponent"] if filtered else None,
        "low_pass_weight": best_alpha * shape["low_pass_relative"],
    }


def linear_term(
    gram: np.ndarray, normalised: np.ndarray, degrees: np.ndarray, shape: dict[str, Any],
    tapered: bool,
) -> np.ndarray:
    """B_ease(λ, p) + r · S(rank, β) `[items, items]` float64 of these Grams at `shape`'s
    (`choose_shape`) values."""
    linear = ease_from_gram(gram, shape["l2"], shape["dropout"])
    if shape["low_pass_relative"]:
        linear += shape["low_pass_relative"] * low_pass_from_gram(
            normalised, degrees, shape["low_pass_rank"], shape["low_pass_exponent"], tapered)
    return linear


def choose_shape(
    held: FoldInSlice, num_users: int, settings: ModelConfig, metric: str
) -> dict[str, Any]:
    """The linear term's (λ, p) and then its filter's (rank, β, r) that rank the slice's
    held-out items best (r = 0: no filter, always a candidate). r is tried as multiples
    (`low_pass_weights`) of the ratio of EASE's score spread to x · S's (per-user standard
    deviations, averaged), so one grid serves any catalogue size."""
    seen = held.inputs > 0
    best_value, best_ease, best = -1.0, None, {}
    for l2, dropout in itertools.product(settings.linear_blend_lambdas,
                                         settings.linear_blend_dropouts):
        scores = held.inputs @ ease_from_gram(held.gram, l2, dropout)
        value = validation_score(scores, seen, held.truth, metric)
        if value > best_value:
            best_value, best_ease = value, scores
            best = {"l2": float(l2), "dropout": float(dropout)}
    best.update({f"fold_in_{metric}_ease": best_value, "low_pass_rank": None,
                 "low_pass_exponent": None, "low_pass_relative": 0.0})
    ranks = candidate_ranks(settings.low_pass_ranks, num_users, held.gram.shape[0])
    weights = [weight for weight in settings.low_pass_weights if weight > 0]
    spread = float(np.mean(np.std(best_ease, axis=1)))
    for exponent in settings.low_pass_exponents if ranks and weights else ():
        left, right = low_pass_factors(held.normalised_gram, held.degrees, max(ranks), exponent)
        projected = held.inputs @ left
        for rank in ranks:
            taper = cosine_taper(rank) if settings.low_pass_shape == "cosine" else 1.0
            filtered = (projected[:, :rank] * taper) @ right[:rank]
            unit = spread / max(float(np.mean(np.std(filtered, axis=1))), 1e-12)
            for multiple in weights:
                value = validation_score(best_ease + multiple * unit * filtered, seen,
                                         held.truth, metric)
                if value > best_value:
                    best_value = value
                    best.update(low_pass_rank=int(rank), low_pass_exponent=float(exponent),
                                low_pass_relative=float(multiple * unit))
    best[f"fold_in_{metric}_low_pass"] = best_value
    return best
