"""Counts the attribute lift tables after training and picks their weights on validation.

Why after training, in closed form: the lift (`recsys_cvae.model.attribute_lift`) is
popularity within each attribute value relative to overall popularity, a count over the
training users; what is left to learn is how much of it the CVAE's logits want, one
number for `generate` and one for `recommend`, plus the shrinkage κ. Those are chosen on
the validation users:

    cold: `generate` from the attributes alone, ranked against the user's whole log
          (history and held-out targets): what an attribute-only user is asked to predict.
    warm: `recommend` from history + attributes, ranked against the held-out targets with
          the history excluded, as the training validation does.

γ = 0 (the trained model unchanged) is always a candidate, so validation never gets worse.
Where the validation users are also training users (the weak and temporal protocols hold
out some of each user's interactions), each one's own counts are taken out of the tables
it is scored with (leave-one-out), or the lift would recite their histories back to them.
The serving refit has no validation split: it recounts the tables on all its data and
reuses the protocol model's (κ, γ_cold, γ_warm) (`apply_lift`).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.spec import HISTORY, TARGETS, FeatureSpec
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.ease_blend import validation_score

log = logging.getLogger(__name__)

# Validation users scored per candidate: at most this many, and at most MAX_VALIDATION_CELLS
# users × items (a few such float32 arrays are held, and each of the grid's ~300 candidates
# ranks one: on a 27k-item catalogue that is ~740 users, ~0.2 s a candidate).
MAX_VALIDATION_USERS = 5_000
MAX_VALIDATION_CELLS = 20_000_000


def count_buckets(
    model: Any, spec: FeatureSpec, splits: Sequence[str], batch_size: int, fold_targets: bool
) -> tuple[np.ndarray, set[bytes]]:
    """(counts `[num_items, buckets]` float64, the users counted): n_{v,i}, how many users
    of bucket v have item i in their input, over `splits` (batch by batch: X is never held)."""
    lift = model.lift
    counts = np.zeros((spec.num_items, lift.num_buckets))
    users: set[bytes] = set()
    for batch in make_dataset(spec, list(splits), batch_size, fold_targets=fold_targets):
        x = model.history_mask(batch[HISTORY])  # [batch, items] 0/1
        onehot = lift.multi_hot(model.condition_encoder.bucket_indices(batch))
        counts += tf.matmul(x, onehot, transpose_a=True).numpy()
        users.update(batch["user_id"].numpy().tolist())
    return counts, users


def lift_table(
    counts: np.ndarray, users: int, offsets: dict[str, int], sizes: dict[str, int],
    pseudo_users: float,
) -> np.ndarray:
    """lift[i, v] = log p̂(i | v) − log p(i) `[num_items, buckets]` float32 (module docstring
    of `attribute_lift`): each attribute's columns hold every user once, so any one
    attribute's columns sum to the item counts n_i."""
    popularity, kappa = _popularity(counts, users, offsets, sizes, pseudo_users)
    per_bucket = counts.sum(axis=0)  # N_v
    smoothed = (counts + kappa * popularity[:, None]) / (per_bucket[None, :] + kappa)
    return (np.log(smoothed) - np.log(popularity)[:, None]).astype(np.float32)


def _popularity(
    counts: np.ndarray, users: int, offsets: dict[str, int], sizes: dict[str, int],
    pseudo_users: float,
) -> tuple[np.ndarray, float]:
    """(p(i) `[num_items]`, > 0 for every item; κ in interactions: pseudo users × mean
    history length)."""
    first = next(iter(offsets))
    item_counts = counts[:, offsets[first]:offsets[first] + sizes[first]].sum(axis=1)
    total = item_counts.sum()
    popularity = (item_counts + 0.5) / (total + 0.5 * len(item_counts))
    return popularity, pseudo_users * total / max(users, 1)


def held_out_term(
    counts: np.ndarray, users: int, offsets: dict[str, int], sizes: dict[str, int],
    pseudo_users: float, buckets: np.ndarray, own: np.ndarray,
) -> np.ndarray:
    """Σ_a lift_a[v_a, i] `[users, num_items]` for users who were counted, each with their
    own row `own` (`[users, num_items]` 0/1) taken out of their bucket's counts."""
    popularity, kappa = _popularity(counts, users, offsets, sizes, pseudo_users)
    term = np.zeros(own.shape, np.float32)
    for name, offset in offsets.items():
        column = offset + np.argmax(buckets[:, offset:offset + sizes[name]], axis=1)
        n = counts[:, column].T - own  # [users, items]
        smoothed = (n + kappa * popularity) / (n.sum(axis=1, keepdims=True) + kappa)
        term += (np.log(np.maximum(smoothed, 1e-30)) - np.log(popularity)).astype(np.float32)
    return term


def _validation_arrays(model: Any, spec: FeatureSpec, split: str, batch_size: int) -> dict:
    """The validation users' generate/recommend logits, multi-hot buckets and truths."""
    index = {item: i for i, item in enumerate(model.item_ids)}
    parts: dict[str, list] = {"generate": [], "recommend": [], "buckets": [], "seen": []}
    warm, cold, ids = [], [], []
    for batch in make_dataset(spec, split, batch_size):
        targets = [{index[t.decode()] for t in row if t and t.decode() in index}
                   for row in batch[TARGETS].numpy()]
        seen = model.history_mask(batch[HISTORY]).numpy() > 0
        parts["generate"].append(model.generate_logits(batch).numpy())
        parts["recommend"].append(model.recommend_logits(batch).numpy())
        buckets = model.condition_encoder.bucket_indices(batch)
        parts["buckets"].append(model.lift.multi_hot(buckets).numpy())
        parts["seen"].append(seen)
        ids += batch["user_id"].numpy().tolist()
        warm += targets
        cold += [set(np.flatnonzero(row).tolist()) | t for row, t in zip(seen, targets)]
        if len(warm) >= validation_users(spec.num_items):
            break
    n = validation_users(spec.num_items)  # the last batch may overshoot
    arrays = {name: np.concatenate(p)[:n] for name, p in parts.items() if p}
    return {**arrays, "warm": warm[:n], "cold": cold[:n], "ids": ids[:n]}


def validation_users(num_items: int) -> int:
    """How many validation users the grid scores for a catalogue of `num_items`."""
    return max(1, min(MAX_VALIDATION_USERS, MAX_VALIDATION_CELLS // max(num_items, 1)))


def _score(scores: np.ndarray, seen: np.ndarray, truth: list[set[int]], metric: str) -> float:
    """Mean `metric` over the users with a non-empty truth (`seen` items excluded)."""
    keep = np.array([bool(t) for t in truth])
    if not keep.any():
        return float("nan")
    return validation_score(scores[keep], seen[keep], [t for t in truth if t], metric)


def blend_lift(
    model: Any, spec: FeatureSpec, train_splits: Sequence[str], validation_split: str,
    batch_size: int, pseudo_users: Sequence[float], weights: Sequence[float], metric: str,
    decoder_weights: Sequence[float] = (1.0,), popularity_weights: Sequence[float] = (0.0,),
) -> dict[str, Any]:
    """Counts the tables on `train_splits` and sets (κ, δ, η, γ_cold) and γ_warm, the best
    on `validation_split`'s `metric` (cold first, then warm at the chosen κ); returns the
    choice and the validation scores before and after."""
    counts, counted = count_buckets(model, spec, train_splits, batch_size, fold_targets=False)
    users = len(counted)
    arrays = _validation_arrays(model, spec, validation_split, batch_size)
    if not arrays["warm"]:
        return {"pseudo_users": None, "cold_weight": 0.0, "warm_weight": 0.0}
    nothing = np.zeros_like(arrays["seen"])
    cold_before = _score(arrays["generate"], nothing, arrays["cold"], metric)
    warm_before = _score(arrays["recommend"], arrays["seen"], arrays["warm"], metric)
    best = {
        "pseudo_users": None, "cold_weight": 0.0, "warm_weight": 0.0,
        "decoder_weight": 1.0, "popularity_weight": 0.0,
        f"validation_cold_{metric}_before": cold_before, f"validation_cold_{metric}": cold_before,
        f"validation_{metric}_before": warm_before, f"validation_{metric}": warm_before,
    }
    lift = model.lift
    # 0/1 per validation user and item: what of theirs the counts hold (leave-one-out).
    own = arrays["seen"] * np.array([[user in counted] for user in arrays["ids"]])

    def term(kappa: float) -> np.ndarray:
        if own.any():
            return held_out_term(counts, users, lift.offsets, lift.sizes, kappa,
                                 arrays["buckets"], own)
        return arrays["buckets"] @ lift_table(counts, users, lift.offsets, lift.sizes, kappa).T

    popularity, _ = _popularity(counts, users, lift.offsets, lift.sizes, 1.0)
    log_popularity = np.log(popularity).astype(np.float32)
    for kappa in pseudo_users:
        lifted = term(kappa)
        for delta, eta, gamma in itertools.product(decoder_weights, popularity_weights,
                                                   [0.0, *weights]):
            if not (delta or eta or gamma):
                continue  # every item scores 0
            scores = delta * arrays["generate"] + eta * log_popularity + gamma * lifted
            value = _score(scores, nothing, arrays["cold"], metric)
            if value > best[f"validation_cold_{metric}"]:
                best.update(pseudo_users=float(kappa), cold_weight=float(gamma),
                            decoder_weight=float(delta), popularity_weight=float(eta),
                            **{f"validation_cold_{metric}": value})
    kappa = best["pseudo_users"] if best["pseudo_users"] is not None else pseudo_users[0]
    lifted = term(kappa)
    for gamma in weights:
        value = _score(arrays["recommend"] + gamma * lifted, arrays["seen"], arrays["warm"],
                       metric)
        if value > best[f"validation_{metric}"]:
            best.update(warm_weight=float(gamma), **{f"validation_{metric}": value})
    if _changes(best):
        best["pseudo_users"] = float(kappa)
        _assign(model, lift_table(counts, users, lift.offsets, lift.sizes, kappa),
                log_popularity, best)
    log.info(
        "attribute lift: κ = %s users; generate %.3g × decoder + %.3g × log popularity + "
        "%.3g × lift, recommend + %.3g × lift; validation cold %s %.4f → %.4f, warm %.4f → "
        "%.4f", best["pseudo_users"], best["decoder_weight"], best["popularity_weight"],
        best["cold_weight"], best["warm_weight"], metric, cold_before,
        best[f"validation_cold_{metric}"], warm_before, best[f"validation_{metric}"],
    )
    return best


def apply_lift(
    model: Any, spec: FeatureSpec, train_splits: Sequence[str], batch_size: int,
    fold_targets: bool, chosen: dict[str, Any],
) -> None:
    """Recounts the tables on `train_splits` and sets a choice made elsewhere (`chosen`:
    what `blend_lift` returned for the selected protocol model)."""
    if not _changes(chosen):
        return
    lift = model.lift
    counts, counted = count_buckets(model, spec, train_splits, batch_size, fold_targets)
    kappa = chosen["pseudo_users"]
    popularity, _ = _popularity(counts, len(counted), lift.offsets, lift.sizes, kappa)
    table = lift_table(counts, len(counted), lift.offsets, lift.sizes, kappa)
    _assign(model, table, np.log(popularity).astype(np.float32), chosen)


CHOICE = ("pseudo_users", "cold_weight", "warm_weight", "decoder_weight", "popularity_weight")


def _changes(choice: dict[str, Any]) -> bool:
    """Whether a choice differs from the trained model (δ = 1, every other weight 0)."""
    return bool(choice.get("cold_weight") or choice.get("warm_weight")
                or choice.get("popularity_weight") or choice.get("decoder_weight", 1.0) != 1.0)


def _assign(model: Any, table: np.ndarray, log_popularity: np.ndarray, choice: dict) -> None:
    lift = model.lift
    lift.table.assign(table)
    lift.log_popularity.assign(log_popularity)
    lift.cold_weight.assign(choice["cold_weight"])
    lift.warm_weight.assign(choice["warm_weight"])
    lift.decoder_weight.assign(choice.get("decoder_weight", 1.0))
    lift.popularity_weight.assign(choice.get("popularity_weight", 0.0))
