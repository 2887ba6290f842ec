"""A fold-in slice of the training users, for choosing closed-form terms on many users.

Why: the validation split is a tenth of the users (~85 on MovieLens-100K), too few to choose
a filter's shape: with NumPy on the deployment split (seeds 0–5), EASE + the tapered low-pass
filter chosen on 85 users reached 1.010 × EASE, chosen on a slice of every user 1.027 ×,
and 1.030 × with hindsight. A closed-form term needs no training run, so it can be chosen
where there is far more signal: hold a random share of each training user's items out, fit
the term on the rest, and score the held-out items. The CVAE never sees this slice; it only
decides the shape of terms whose weight against the CVAE's logits the validation users
still choose (`training.low_pass_blend`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from recsys_cvae.spec import FeatureSpec
from recsys_cvae.training.dataset import make_dataset

# Users scored on the slice: at most this many, and at most MAX_CELLS users × items (the
# inputs are held as float32, and each candidate scores them all).
MAX_USERS = 5_000
MAX_CELLS = 20_000_000


@dataclasses.dataclass
class FoldInSlice:
    """The slice: Grams of the kept part of every training user, and the scored users.

    Attributes:
      gram: XᵀX `[items, items]` float64 of the kept parts (EASE's input).
      normalised_gram: Xᵀ·D_u⁻¹·X of the kept parts (the low-pass filter's input).
      degrees: item degrees `[items]` of the kept parts.
      inputs: kept parts `[users, items]` float32 of the scored users.
      truth: each scored user's held-out item indices.
    """

    gram: np.ndarray
    normalised_gram: np.ndarray
    degrees: np.ndarray
    inputs: np.ndarray
    truth: list[set[int]]


def fold_in_slice(
    model: Any, spec: FeatureSpec, split: str | Sequence[str], batch_size: int,
    share: float = 0.1, seed: int = 0,
) -> FoldInSlice:
    """Holds out `share` of each of `split`'s users' items (independently per item, seeded),
    one pass over the data; users left with nothing held out or nothing kept are counted in
    the Grams but not scored."""
    rng = np.random.default_rng(seed)
    num_items = spec.num_items
    gram = np.zeros((num_items, num_items))
    normalised = np.zeros((num_items, num_items))
    degrees = np.zeros(num_items)
    cap = max(1, min(MAX_USERS, MAX_CELLS // max(num_items, 1)))
    inputs: list[np.ndarray] = []
    truth: list[set[int]] = []
    for batch in make_dataset(spec, split, batch_size):
        x = model.history_input(batch).numpy()
        held = (x > 0) & (rng.random(x.shape) < share)
        kept = np.where(held, 0.0, x).astype(np.float32)
        totals = kept.sum(axis=1, keepdims=True)
        scaled = kept / np.sqrt(np.maximum(totals, 1e-12))
        gram += tf.matmul(kept, kept, transpose_a=True).numpy()
        normalised += tf.matmul(scaled, scaled, transpose_a=True).numpy()
        degrees += kept.sum(axis=0)
        if len(truth) < cap:
            scored = np.flatnonzero(held.any(axis=1) & (totals[:, 0] > 0))[: cap - len(truth)]
            inputs.append(kept[scored])
            truth += [set(np.flatnonzero(held[row]).tolist()) for row in scored]
    scored_inputs = np.concatenate(inputs) if inputs else np.zeros((0, num_items), np.float32)
    return FoldInSlice(gram, normalised, degrees, scored_inputs, truth)
