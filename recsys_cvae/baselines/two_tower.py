"""A TFRS two-tower retrieval baseline: the standard industry opponent of the CVAE.

Why: two-tower retrieval (a user tower and an item tower trained with in-batch softmax) is
what most production recommenders start from. It sees the same inputs as the CVAE's
`recommend` — the user's attributes and history — so it answers "does the generative model
beat a discriminative retrieval model with the same information?".

    user tower   [attribute embeddings ; numeric attributes ; Dense(history / |history|)]
                 -> Dense(hidden, relu) -> Dense(dim)                      [batch, dim]
    item tower   Embedding(item id) + Dense(item categories)              [batch, dim]
    loss         tfrs.tasks.Retrieval (in-batch sampled softmax), with
                 tfrs.metrics.FactorizedTopK over the whole catalogue on validation
    candidates   tfrs.layers.factorized_top_k.BruteForce over every item embedding

Training pairs hold one history item out as the positive and feed the rest as the history
(leave-one-out), so the towers learn to predict unseen items, not to copy the input. Users
without history (cold start) are scored from their attributes alone.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from recsys_cvae import spec as S
from recsys_cvae.config import EvaluateConfig
from recsys_cvae.datasets.item_metadata import item_categories
from recsys_cvae.histories import Histories

EMBEDDING_DIM = 32
HIDDEN = 128
EPOCHS = 8
BATCH_SIZE = 256
MAX_PAIRS_PER_USER = 50


def encode_attributes(spec: S.FeatureSpec, attributes: dict[str, list]) -> np.ndarray:
    """[num_users, num_attributes] float32: categorical values as vocabulary index + 1 (0 =
    unknown), numeric values standardised with the spec's mean/std (0 = unknown)."""
    columns = []
    for a in spec.attributes:
        values = attributes[a.name]
        if a.is_categorical:
            index = {v: i + 1 for i, v in enumerate(spec.attribute_vocabulary(a.name))}
            columns.append([index.get(v, 0) for v in values])
        else:
            columns.append([0.0 if math.isnan(v) else (v - a.mean) / a.std for v in values])
    num_users = len(next(iter(attributes.values()), []))
    if not columns:
        return np.zeros((num_users, 0), dtype=np.float32)
    return np.array(columns, dtype=np.float32).T


class TwoTower(tfrs.Model):
    """User and item towers with a retrieval task.

    Args:
      spec: the feature spec (attribute kinds and vocabulary sizes).
      item_categories: [num_items, c] 0/1 item metadata, or None.
      dim: embedding size of both towers.
    """

    def __init__(self, spec: S.FeatureSpec, item_categories: np.ndarray | None, dim: int):
        super().__init__()
        self.kinds = [a.is_categorical for a in spec.attributes]
        self.attribute_embeddings = [
            tf.keras.layers.Embedding(a.vocabulary_size + 1, 8) if a.is_categorical else None
            for a in spec.attributes
        ]
        self.history_layer = tf.keras.layers.Dense(HIDDEN, use_bias=False)
        self.user_mlp = tf.keras.Sequential(
            [tf.keras.layers.Dense(HIDDEN, activation="relu"), tf.keras.layers.Dense(dim)]
        )
        self.item_embedding = tf.keras.layers.Embedding(spec.num_items, dim)
        self.categories = (
            None if item_categories is None else tf.constant(item_categories, tf.float32)
        )
        self.category_layer = tf.keras.layers.Dense(dim, use_bias=False)
        self.task = tfrs.tasks.Retrieval()

    def user_embedding(self, attributes: tf.Tensor, history: tf.Tensor) -> tf.Tensor:
        """attributes [batch, num_attributes], history [batch, num_items] 0/1 -> [batch, dim]."""
        parts = []
        for j, (categorical, layer) in enumerate(zip(self.kinds, self.attribute_embeddings)):
            column = attributes[:, j]
            parts.append(layer(tf.cast(column, tf.int32)) if categorical else column[:, None])
        norm = tf.maximum(tf.reduce_sum(history, axis=1, keepdims=True), 1.0)
        parts.append(self.history_layer(history / tf.sqrt(norm)))
        return self.user_mlp(tf.concat(parts, axis=1))

    def item_tower(self, item_index: tf.Tensor) -> tf.Tensor:
        """item_index [batch] int -> [batch, dim]."""
        embedding = self.item_embedding(item_index)
        if self.categories is not None:
            embedding += self.category_layer(tf.gather(self.categories, item_index))
        return embedding

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        users = self.user_embedding(features["attributes"], features["history"])
        items = self.item_tower(features["item"])
        return self.task(
            users, items, compute_metrics=not training,
            candidate_sampling_probability=features.get("probability"),
        )


def _pairs(history: Histories, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user row, positive item) for up to MAX_PAIRS_PER_USER items of each user's history."""
    rows, items = [], []
    for u in range(history.shape[0]):
        chosen = history.row(u)
        if len(chosen) > MAX_PAIRS_PER_USER:
            chosen = rng.choice(chosen, MAX_PAIRS_PER_USER, replace=False)
        rows.extend([u] * len(chosen))
        items.extend(chosen.tolist())
    return np.array(rows, dtype=np.int32), np.array(items, dtype=np.int32)


def _multi_hot(history: tf.RaggedTensor, rows: tf.Tensor, num_items: int) -> tf.Tensor:
    """[batch, num_items] float32 0/1 rows of a ragged [num_users, None] history: built per
    batch, so the training users' dense matrix (11 GB at ML-20M size) never exists."""
    chosen = tf.gather(history, rows)
    coordinates = tf.stack([chosen.value_rowids(), chosen.flat_values], axis=1)
    ones = tf.ones_like(chosen.flat_values, tf.float32)
    return tf.scatter_nd(coordinates, ones, tf.stack([tf.size(rows, tf.int64), num_items]))


def _dataset(history, attributes, rows, items, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Leave-one-out examples: the positive is removed from the history it is predicted from."""
    data = tf.data.Dataset.from_tensor_slices((rows, items))
    if shuffle:
        data = data.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)

    # logQ correction: in-batch negatives are drawn in proportion to popularity, so without
    # it popular items are pushed down as negatives far more often than they are positives.
    num_items = history.num_items
    counts = np.bincount(items, minlength=num_items).astype(np.float32)
    probability = tf.constant(counts / max(counts.sum(), 1.0))
    ragged = tf.RaggedTensor.from_row_splits(
        tf.constant(history.indices.astype(np.int64)), tf.constant(history.indptr)
    )
    attributes = tf.constant(attributes)

    def example(row, item):
        rest = _multi_hot(ragged, row, num_items) - tf.one_hot(item, num_items)
        return {
            "attributes": tf.gather(attributes, row), "history": rest, "item": item,
            "probability": tf.gather(probability, item),
        }

    return data.batch(BATCH_SIZE).map(lambda r, i: example(r, i))


def fit_two_tower(spec, train, validation, categories, seed: int = 0) -> tuple[TwoTower, dict]:
    """Trains the towers on `train` (baselines.SplitData); reports FactorizedTopK on the
    validation users' held-out items (history = their fold-in)."""
    tf.keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = TwoTower(spec, categories, EMBEDDING_DIM)
    model.compile(optimizer=tf.keras.optimizers.Adagrad(0.1))
    rows, items = _pairs(train.history, rng)
    attributes = encode_attributes(spec, train.attributes)
    model.fit(_dataset(train.history, attributes, rows, items, True, seed), epochs=EPOCHS,
              verbose=0)
    params: dict[str, Any] = {"epochs": EPOCHS, "dim": EMBEDDING_DIM, "pairs": int(len(rows))}
    if validation is not None and validation.truth:
        all_items = tf.data.Dataset.range(spec.num_items).batch(512)
        metric = tfrs.metrics.FactorizedTopK(
            candidates=all_items.map(lambda i: model.item_tower(tf.cast(i, tf.int32))), ks=(10,)
        )
        index = {item: i for i, item in enumerate(spec.item_vocabulary())}
        vrows, vitems = [], []
        for u, user in enumerate(validation.user_ids):
            for item in validation.truth.get(user, ()):
                if item in index:
                    vrows.append(u)
                    vitems.append(index[item])
        val_attributes = encode_attributes(spec, validation.attributes)
        for u in range(0, len(vrows), BATCH_SIZE):
            batch_rows = np.array(vrows[u : u + BATCH_SIZE])
            users = model.user_embedding(
                tf.constant(val_attributes[batch_rows]),
                tf.constant(validation.history.dense(batch_rows, np.float32)),
            )
            items_batch = model.item_tower(tf.constant(vitems[u : u + BATCH_SIZE]))
            metric.update_state(users, items_batch)
        # Share of (validation user, held-out item) pairs whose item is in the user's top 10
        # over the whole catalogue (history items not excluded).
        params["validation_factorized_top_10"] = float(metric.result()[0])
    return model, params


def two_tower_scorer(spec, train, validation, items, config: EvaluateConfig):
    """(scorer, params) for `baselines.build.build_baselines`: scores come from a BruteForce index
    over all item embeddings; items it does not return score -inf."""
    categories = item_categories(list(items), config.items_file)
    model, params = fit_two_tower(spec, train, validation, categories, config.seed)
    params["item_categories"] = 0 if categories is None else int(categories.shape[1])
    num_items = spec.num_items
    item_ids = tf.range(num_items)
    brute_force = tfrs.layers.factorized_top_k.BruteForce(k=num_items)
    brute_force.index(model.item_tower(item_ids), item_ids)

    def score(data, rows: slice) -> np.ndarray:
        history = data.history.dense(rows)
        attributes = encode_attributes(
            spec, {n: v[rows] for n, v in data.attributes.items()}
        )
        users = model.user_embedding(tf.constant(attributes), tf.constant(history, tf.float32))
        top_scores, top_ids = brute_force.call(users, k=num_items)
        out = np.full(history.shape, -np.inf, dtype=np.float64)
        np.put_along_axis(out, top_ids.numpy().astype(np.int64), top_scores.numpy(), axis=1)
        return out

    return score, params
