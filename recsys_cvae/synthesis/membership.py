"""Membership inference: can a user's likelihood under the model tell whether it trained on them?

Why two likelihoods: synthetic users are drawn from the generative model alone, z ~ p(z|c)
and then items from the decoder's softmax (`CVAE.sample_logits`); nothing else in the export
touches them. What they can leak is what that generator holds, so the privacy goal is judged
on its likelihood, log p(x|c) = log ∫ p(x|z,c) p(z|c) dz, estimated the standard way
(importance-weighted, Burda et al. 2016) with the encoder q(z|x,c) as the proposal only:

    log p̂(x|c) = logsumexp_k [log p(x|z_k,c) + log p(z_k|c) − log q(z_k|x,c)] − log K

The recommend path (history folded in by the encoder at its mean, plus the item-item branch
when the model has one) is what ranking serves: it is meant to fit its training users, and
its reconstruction AUC is reported next to the generator's so nobody reads one for the other.

Both are per-item log-likelihoods (divided by the user's item count) of the whole item set,
members (the protocol model's train split) against non-members (its test split, never
trained on); the AUC is the Mann–Whitney statistic.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.synthesis.item_sets import item_matrix

IMPORTANCE_SAMPLES = 32
BATCH = 256


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney U)."""
    scores = np.concatenate([positives, negatives])
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks within ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    n, m = len(positives), len(negatives)
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def membership_auc(model_dir: str, spec: S.FeatureSpec, max_users: int = 2000,
                   seed: int = 0) -> dict[str, float] | None:
    """{"generator": AUC, "recommend_path": AUC} for the protocol model at `model_dir`, or
    None when either split is empty (module docstring)."""
    from recsys_cvae.model.model_dir import load_trained_model  # deferred: loads TensorFlow

    model = load_trained_model(model_dir)
    rng = np.random.default_rng(seed)
    scores: dict[str, dict[str, np.ndarray]] = {}
    for label, role in (("member", "train"), ("other", "test")):
        split = spec.protocol_split(role)
        users = list(UR.read_user_records(spec, split)) if split in spec.splits else []
        users = [users[i] for i in rng.permutation(len(users))[:max_users]]
        if not users:
            return None
        scores[label] = _user_scores(model, spec, users, seed)
    return {path: auc(scores["member"][path], scores["other"][path])
            for path in ("generator", "recommend_path")}


def _user_scores(model: Any, spec: S.FeatureSpec, users: list[dict],
                 seed: int) -> dict[str, np.ndarray]:
    import tensorflow as tf

    index = {item: i for i, item in enumerate(model.item_ids)}
    generator, recommend = [], []
    for start in range(0, len(users), BATCH):
        batch = users[start:start + BATCH]
        items = [u[S.HISTORY] + u[S.TARGETS] for u in batch]
        width = max(len(i) for i in items)
        features = {S.HISTORY: tf.constant([i + [""] * (width - len(i)) for i in items])}
        for attribute in spec.attributes:
            features[attribute.name] = tf.constant(
                [u[attribute.name] for u in batch],
                tf.string if attribute.is_categorical else tf.float32)
        x = item_matrix(items, index)
        counts = np.maximum(x.sum(1), 1.0)
        generator.extend(_generator_log_likelihood(model, features, x, seed + start) / counts)
        log_p = tf.nn.log_softmax(model.recommend_logits(features)).numpy()
        recommend.extend((log_p * x).sum(1) / counts)
    return {"generator": np.array(generator), "recommend_path": np.array(recommend)}


def _generator_log_likelihood(model: Any, features: dict, x: np.ndarray,
                              seed: int) -> np.ndarray:
    """log p̂(x|c) `[batch]` by importance sampling with q(z|x,c) (module docstring)."""
    import tensorflow as tf

    c = model.condition(features)
    q_mean, q_log_var = model.encode(features)
    p_mean, p_log_var = model.prior_params(c, tf.shape(q_mean)[0])
    x = tf.constant(x)
    log_weights = []
    for k in range(IMPORTANCE_SAMPLES):
        noise = tf.random.stateless_normal(tf.shape(q_mean), seed=[seed, k])
        z = q_mean + tf.exp(0.5 * q_log_var) * noise
        logits = model.decoder.logits(model.decoder.hidden_state(z, c))
        log_p_x = tf.reduce_sum(x * tf.nn.log_softmax(tf.cast(logits, tf.float32)), 1)
        log_weights.append(log_p_x + _log_normal(z, p_mean, p_log_var)
                           - _log_normal(z, q_mean, q_log_var))
    stacked = tf.stack(log_weights, axis=1)
    return (tf.reduce_logsumexp(stacked, axis=1) - math.log(IMPORTANCE_SAMPLES)).numpy()


def _log_normal(z, mean, log_var):
    import tensorflow as tf

    return -0.5 * tf.reduce_sum(
        math.log(2 * math.pi) + log_var + tf.square(z - mean) * tf.exp(-log_var), axis=1)
