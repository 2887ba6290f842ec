"""Counts the attribute lift tables after training and picks their weights.

Why after training, in closed form: the lift (`recsys_cvae.model.attribute_lift`) is
popularity within each attribute value relative to overall popularity, a count over the
training users; what is left to choose is how much of each attribute's counts to trust, how
much of it the CVAE's logits want (one number for `generate`, one for `recommend`), and the
shrinkage κ.

    shape: κ and a weight w_a per attribute for the counting term log p(i) + Σ_a w_a lift_a,
           on the training users themselves (`choose_counting_shape`), each ranking their own
           log from everyone else's counts (leave-one-out). The family holds popularity and
           every single-attribute segment popularity.
    cold:  `generate` = δ · decoder + ω · that term, from the attributes alone, ranked
           against the validation user's whole log: what an attribute-only user is asked.
    warm:  `recommend` + γ_w · Σ_a w_a lift_a, ranked against the held-out targets with the
           history excluded, as the training validation does.

Why the shape on the training users: the ~85 validation users of ML-100K chose among 288
(κ, δ, η, γ) candidates, and the choice was noise. Over split seeds 0–5 it switched the
decoder off on two and kept it whole on two, and the served cold model stayed 0.0056 NDCG@10
below the hindsight best segment popularity. Counting needs no training, so every training
user is a fair, unseen judge of the counts of the others; only the mix with the decoder
(which has seen them) is left to the validation users, from a few candidates.

δ = 1, ω = γ_w = 0 (the trained model unchanged) is always a candidate, so validation never
gets worse. Where the validation users are also training users (the weak and temporal
protocols hold out some of each user's interactions), each one's own counts are taken out of
the tables it is scored with, or the lift would recite their histories back to them. The
serving refit has no validation split: it recounts the tables on all its data and reuses the
protocol model's choice (`apply_lift`).
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
    item_counts = _item_counts(counts, offsets, sizes)
    total = item_counts.sum()
    popularity = (item_counts + 0.5) / (total + 0.5 * len(item_counts))
    return popularity, pseudo_users * total / max(users, 1)


def _item_counts(counts: np.ndarray, offsets: dict[str, int], sizes: dict[str, int]) -> np.ndarray:
    """n_i `[num_items]`: any one attribute's columns hold every counted user once."""
    first = next(iter(offsets))
    return counts[:, offsets[first]:offsets[first] + sizes[first]].sum(axis=1)


def held_out_term(
    counts: np.ndarray, users: int, offsets: dict[str, int], sizes: dict[str, int],
    pseudo_users: float, buckets: np.ndarray, own: np.ndarray,
) -> np.ndarray:
    """Σ_a lift_a[v_a, i] `[users, num_items]` for users who were counted, each with their
    own row `own` (`[users, num_items]` 0/1) taken out of their bucket's counts."""
    terms = held_out_terms(counts, users, offsets, sizes, pseudo_users, buckets, own)
    return np.sum(list(terms.values()), axis=0)


def held_out_terms(
    counts: np.ndarray, users: int, offsets: dict[str, int], sizes: dict[str, int],
    pseudo_users: float, buckets: np.ndarray, own: np.ndarray,
) -> dict[str, np.ndarray]:
    """Attribute name → lift_a[v_a, i] `[users, num_items]`, leave-one-out as
    `held_out_term` (which is their sum)."""
    popularity, kappa = _popularity(counts, users, offsets, sizes, pseudo_users)
    terms = {}
    for name, offset in offsets.items():
        column = offset + np.argmax(buckets[:, offset:offset + sizes[name]], axis=1)
        n = counts[:, column].T - own  # [users, items]
        smoothed = (n + kappa * popularity) / (n.sum(axis=1, keepdims=True) + kappa)
        terms[name] = (np.log(np.maximum(smoothed, 1e-30))
                       - np.log(popularity)).astype(np.float32)
    return terms


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


def _counted_arrays(
    model: Any, spec: FeatureSpec, splits: Sequence[str], batch_size: int
) -> dict[str, np.ndarray]:
    """Counted users' multi-hot buckets and inputs (`seen`, 0/1), as `count_buckets` reads
    them, for at most `validation_users` users."""
    limit = validation_users(spec.num_items)
    buckets, seen, users = [], [], 0
    for batch in make_dataset(spec, list(splits), batch_size, fold_targets=False):
        seen.append(model.history_mask(batch[HISTORY]).numpy())
        buckets.append(model.lift.multi_hot(model.condition_encoder.bucket_indices(batch))
                       .numpy())
        users += len(seen[-1])
        if users >= limit:
            break
    if not seen:
        return {"buckets": np.zeros((0, model.lift.num_buckets)),
                "seen": np.zeros((0, spec.num_items))}
    return {"buckets": np.concatenate(buckets)[:limit], "seen": np.concatenate(seen)[:limit]}


def choose_counting_shape(
    model: Any, spec: FeatureSpec, train_splits: Sequence[str], batch_size: int,
    counts: np.ndarray, users: int, pseudo_users: Sequence[float], weights: Sequence[float],
    metric: str,
) -> dict[str, Any]:
    """κ and a weight per attribute for the counting term log p(i) + Σ_a w_a · lift_a,
    chosen on the training users themselves, each ranking their own log from the counts of
    everyone else (leave-one-out): hundreds of users where validation has tens. The family
    holds plain popularity (every w_a = 0) and each single-attribute segment popularity
    (log p(i | a = v) = log p(i) + lift_a). Returns `pseudo_users`, `attribute_weights` and
    the training users' `metric` for popularity and for the choice."""
    lift = model.lift
    arrays = _counted_arrays(model, spec, train_splits, batch_size)
    own = arrays["seen"]
    truth = [set(np.flatnonzero(row).tolist()) for row in own]
    nothing = np.zeros_like(own)
    item_counts = _item_counts(counts, lift.offsets, lift.sizes)
    left = item_counts[None, :] - own  # everyone else's counts, per user
    base = np.log((left + 0.5) / (left.sum(axis=1, keepdims=True) + 0.5 * len(item_counts)))
    base = base.astype(np.float32)
    popularity_score = _score(base, nothing, truth, metric)
    best = {"pseudo_users": float(pseudo_users[0]),
            "attribute_weights": {name: 0.0 for name in lift.offsets},
            f"counted_{metric}_popularity": popularity_score, f"counted_{metric}": popularity_score}
    for kappa in pseudo_users:
        terms = held_out_terms(counts, users, lift.offsets, lift.sizes, kappa,
                               arrays["buckets"], own)
        chosen = {name: 0.0 for name in terms}
        current, current_score = base.copy(), popularity_score
        for _ in range(2):  # coordinate ascent, two sweeps
            for name, term in terms.items():
                for weight in [0.0, *weights]:
                    if weight == chosen[name]:
                        continue
                    trial = current + (weight - chosen[name]) * term
                    value = _score(trial, nothing, truth, metric)
                    if value > current_score:
                        current, current_score = trial, value
                        chosen[name] = float(weight)
        if current_score > best[f"counted_{metric}"]:
            best.update(pseudo_users=float(kappa), attribute_weights=chosen,
                        **{f"counted_{metric}": current_score})
    return best


def weighted_table(
    counts: np.ndarray, users: int, lift: Any, kappa: float, attribute_weights: dict | None
) -> np.ndarray:
    """`lift_table` with each attribute's columns scaled by its weight (1 when unset)."""
    table = lift_table(counts, users, lift.offsets, lift.sizes, kappa)
    for name, offset in lift.offsets.items():
        table[:, offset:offset + lift.sizes[name]] *= (attribute_weights or {}).get(name, 1.0)
    return table


def blend_lift(
    model: Any, spec: FeatureSpec, train_splits: Sequence[str], validation_split: str,
    batch_size: int, pseudo_users: Sequence[float], weights: Sequence[float], metric: str,
    decoder_weights: Sequence[float] = (1.0,),
) -> dict[str, Any]:
    """Counts the tables on `train_splits`; chooses the counting term's shape (κ, w_a) on the
    training users (`choose_counting_shape`), then `generate`'s mix δ · decoder + ω · term
    and `recommend`'s γ_warm on `validation_split`'s `metric`; returns the choice and the
    validation scores before and after."""
    counts, counted = count_buckets(model, spec, train_splits, batch_size, fold_targets=False)
    users = len(counted)
    arrays = _validation_arrays(model, spec, validation_split, batch_size)
    if not arrays["warm"]:
        return {"pseudo_users": None, "cold_weight": 0.0, "warm_weight": 0.0}
    nothing = np.zeros_like(arrays["seen"])
    cold_before = _score(arrays["generate"], nothing, arrays["cold"], metric)
    warm_before = _score(arrays["recommend"], arrays["seen"], arrays["warm"], metric)
    shape = choose_counting_shape(model, spec, train_splits, batch_size, counts, users,
                                  pseudo_users, weights, metric)
    kappa, attribute_weights = shape["pseudo_users"], shape["attribute_weights"]
    best = {
        **shape, "cold_weight": 0.0, "warm_weight": 0.0,
        "decoder_weight": 1.0, "popularity_weight": 0.0,
        f"validation_cold_{metric}_before": cold_before, f"validation_cold_{metric}": cold_before,
        f"validation_{metric}_before": warm_before, f"validation_{metric}": warm_before,
    }
    lift = model.lift
    # 0/1 per validation user and item: what of theirs the counts hold (leave-one-out).
    own = arrays["seen"] * np.array([[user in counted] for user in arrays["ids"]])
    if own.any():
        terms = held_out_terms(counts, users, lift.offsets, lift.sizes, kappa,
                               arrays["buckets"], own)
        lifted = np.sum([attribute_weights[name] * term for name, term in terms.items()],
                        axis=0)
    else:
        lifted = arrays["buckets"] @ weighted_table(counts, users, lift, kappa,
                                                    attribute_weights).T
    popularity, _ = _popularity(counts, users, lift.offsets, lift.sizes, 1.0)
    log_popularity = np.log(popularity).astype(np.float32)
    term = log_popularity + lifted
    for delta, omega in itertools.product(decoder_weights, [0.0, *weights]):
        if not (delta or omega):
            continue  # every item scores 0
        value = _score(delta * arrays["generate"] + omega * term, nothing, arrays["cold"],
                       metric)
        if value > best[f"validation_cold_{metric}"]:
            best.update(cold_weight=float(omega), popularity_weight=float(omega),
                        decoder_weight=float(delta), **{f"validation_cold_{metric}": value})
    for gamma in weights:
        value = _score(arrays["recommend"] + gamma * lifted, arrays["seen"], arrays["warm"],
                       metric)
        if value > best[f"validation_{metric}"]:
            best.update(warm_weight=float(gamma), **{f"validation_{metric}": value})
    if _changes(best):
        _assign(model, weighted_table(counts, users, lift, kappa, attribute_weights),
                log_popularity, best)
    log.info(
        "attribute lift: κ = %s users, attribute weights %s; generate %.3g × decoder + "
        "%.3g × (log popularity + weighted lift), recommend + %.3g × weighted lift; "
        "validation cold %s %.4f → %.4f, warm %.4f → %.4f", kappa, attribute_weights,
        best["decoder_weight"], best["cold_weight"], best["warm_weight"], metric,
        cold_before, best[f"validation_cold_{metric}"], warm_before,
        best[f"validation_{metric}"],
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
    table = weighted_table(counts, len(counted), lift, kappa, chosen.get("attribute_weights"))
    _assign(model, table, np.log(popularity).astype(np.float32), chosen)


CHOICE = ("pseudo_users", "cold_weight", "warm_weight", "decoder_weight", "popularity_weight",
          "attribute_weights")


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
