"""Preprocessing layers built from the feature spec: item and attribute lookups, normalisation.

Why layers: the lookups and the standardisation live inside the model, so the exported
SavedModel takes the same raw strings and floats that tf.data yields, and training and
serving cannot disagree about an index or a mean (the TFX "features.py" idea).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import tensorflow as tf
import tensorflow_recommenders as tfrs

from recsys_cvae.spec import FeatureSpec

# Optional per-item weights of the history (rating or recency), a float list aligned with
# `history_item_ids`. The model uses them as x when a split's examples carry them.
HISTORY_WEIGHTS = "history_weights"


class ItemMultiHot(tf.keras.layers.Layer):
    """Padded item-id strings → multi-hot rows over the item vocabulary.

    Why a layer: the history is looked up inside the model, so the pipeline and the serving
    request carry plain ids and both use this one vocabulary (item index = vocab line).
    Input `[batch, n]` tf.string ("" and unknown ids are ignored; duplicates count once).
    Output `[batch, num_items]` float32 of 0/1.
    """

    def __init__(self, item_ids: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._vocabulary = list(item_ids)
        # Index 0 is the OOV bucket ("" and unknown ids land there); it is sliced away.
        self.lookup = tf.keras.layers.StringLookup(
            vocabulary=self._vocabulary, num_oov_indices=1, output_mode="multi_hot"
        )
        self.index_lookup = tf.keras.layers.StringLookup(
            vocabulary=self._vocabulary, num_oov_indices=1
        )

    def call(self, item_ids: tf.Tensor) -> tf.Tensor:
        return self.lookup(item_ids)[:, 1:]

    def sparse(
        self, item_ids: tf.Tensor, weights: tf.Tensor | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """One lookup of the history as the sparse x: (indices, values), each `[batch, n]`.

        indices are 1 + the item's vocabulary index at an item's first position in its row,
        0 for padding, unknown ids and the item's later positions; values are x there (1, or
        the item's largest weight in the row, negative weights clipped to 0), 0 elsewhere.
        So Σ_j values_j · W[indices_j] equals the dense x·W and Σ_j values_j² equals ‖x‖².
        Repeats are found by `tf.unique` over (row, index) keys, so the cost is O(batch · n),
        never O(batch · num_items).
        """
        indices = tf.cast(self.index_lookup(item_ids), tf.int32)  # [batch, n], 0 = OOV or ""
        shape = tf.shape(indices)
        rows = tf.broadcast_to(tf.range(tf.cast(shape[0], tf.int64))[:, None], shape)
        keys = tf.reshape(rows * (len(self._vocabulary) + 1) + tf.cast(indices, tf.int64), [-1])
        unique, slot = tf.unique(keys)
        num_unique = tf.size(unique)
        position = tf.range(tf.size(keys))
        first = tf.gather(tf.math.unsorted_segment_min(position, slot, num_unique), slot)
        keep = (position == first) & (tf.reshape(indices, [-1]) > 0)
        if weights is None:
            values = tf.ones(tf.shape(keys))
        else:
            values = tf.maximum(tf.reshape(tf.cast(weights, tf.float32), [-1]), 0.0)
            values = tf.gather(tf.math.unsorted_segment_max(values, slot, num_unique), slot)
        indices = tf.where(keep, tf.reshape(indices, [-1]), 0)
        values = tf.where(keep, values, 0.0)
        return tf.reshape(indices, shape), tf.reshape(values, shape)

    def dense(self, indices: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """x `[batch, num_items]` float32 from `sparse`'s indices and values (a scatter of
        batch · n values; padding scatters a harmless 0 into item 0's column)."""
        shape = tf.shape(indices)
        rows = tf.broadcast_to(tf.range(shape[0])[:, None], shape)
        pairs = tf.stack([rows, tf.maximum(indices - 1, 0)], axis=-1)  # [batch, n, 2]
        x = tf.zeros([shape[0], len(self._vocabulary)])
        return tf.tensor_scatter_nd_max(x, pairs, tf.cast(weights, tf.float32))

    def weighted(self, item_ids: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """Like `call`, but each known item gets its weight (the largest, if repeated).

        item_ids `[batch, n]` tf.string, weights `[batch, n]` float (padding weight ignored)
        → `[batch, num_items]` float32. A sparse scatter: no `[batch, n, num_items]` one-hot.
        """
        indices = tf.cast(self.index_lookup(item_ids), tf.int32)  # [batch, n], 0 = OOV
        values = tf.where(indices > 0, tf.maximum(tf.cast(weights, tf.float32), 0.0), 0.0)
        return self.dense(indices, values)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "item_ids": list(self._vocabulary)}


class ConditionEncoder(tf.keras.layers.Layer):
    """User attributes → condition vector c, shared by the encoder, prior and decoder.

    Why a DCN cross layer: tastes often depend on combinations (region × age group), and
    a cross layer learns those bounded-degree interactions explicitly and cheaply.
    Categorical values are embedded (unknown or empty → one of the OOV buckets); numeric
    values are standardised with the training mean/std, and NaN becomes 0 plus a missing
    indicator, so "unknown" is something the model can learn about rather than an error.
    A numeric attribute with quantile `boundaries` (the feature job's) is also bucketised
    and its bucket embedded beside the scalar: a scalar through one cross layer and a tanh
    expresses monotone effects well and a taste that peaks in middle age badly.

    Args:
      attributes: one dict per attribute, in spec order: `name`, `kind` (`categorical` or
        `numeric`), and `vocabulary` + `num_oov_buckets` or `mean` + `std` (+ optional
        `boundaries`).
      embedding_dim: size of each embedding; 0 = by the attribute's number of values
        (`embedding_size`).
      condition_dim: size of c.
      num_cross_layers: DCN cross layers over the concatenated attribute features.

    Input: the features dict (each attribute `[batch]`). Output: c, `[batch, condition_dim]`.
    """

    def __init__(
        self,
        attributes: list[dict[str, Any]],
        embedding_dim: int,
        condition_dim: int,
        num_cross_layers: int,
        **kwargs: Any,
    ) -> None:
        # No input autocast: numerics are standardised in float32 (a float16 cast of a raw
        # value such as a timestamp overflows), then cast to the compute dtype.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if not attributes:
            raise ValueError("ConditionEncoder needs at least one attribute")
        self._attributes = [dict(a) for a in attributes]
        self.embedding_dim = embedding_dim
        self.condition_dim = condition_dim
        self.num_cross_layers = num_cross_layers
        self.lookups, self.embeddings = {}, {}
        for attribute in self._attributes:
            name, size = attribute["name"], bucket_count(attribute)
            if attribute["kind"] == "categorical":
                self.lookups[name] = tf.keras.layers.StringLookup(
                    vocabulary=list(attribute["vocabulary"]),
                    num_oov_indices=max(1, int(attribute.get("num_oov_buckets", 1))),
                )
            if size:
                self.embeddings[name] = tf.keras.layers.Embedding(
                    size, embedding_dim or embedding_size(size)
                )
        self.crosses = [tfrs.layers.dcn.Cross() for _ in range(num_cross_layers)]
        self.project = tf.keras.layers.Dense(condition_dim, activation="tanh")

    def bucket_indices(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """attribute → `[batch]` int64 bucket (its embedding row) for every categorical and
        bucketised numeric attribute, in spec order: what `attribute_lift` counts by."""
        indices = {}
        for attribute in self._attributes:
            name = attribute["name"]
            if name not in features:
                raise KeyError(f"features have no attribute {name!r}; expected {self.names}")
            value = tf.reshape(features[name], [-1])
            if attribute["kind"] == "categorical":
                indices[name] = self.lookups[name](value)
            elif attribute.get("boundaries"):
                indices[name] = numeric_bucket(value, attribute["boundaries"])
        return indices

    def call(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        parts = []
        buckets = self.bucket_indices(features)
        for attribute in self._attributes:
            name = attribute["name"]
            if attribute["kind"] == "numeric":
                value = tf.cast(tf.reshape(features[name], [-1]), tf.float32)
                missing = tf.math.is_nan(value)
                standardised = (value - attribute["mean"]) / attribute["std"]
                parts.append(tf.where(missing, 0.0, standardised)[:, None])
                parts.append(tf.cast(missing, tf.float32)[:, None])
            if name in buckets:
                parts.append(self.embeddings[name](buckets[name]))
        x0 = tf.concat([tf.cast(p, self.compute_dtype) for p in parts], axis=-1)
        x = x0
        for cross in self.crosses:
            x = cross(x0, x)
        return self.project(x)

    @property
    def names(self) -> list[str]:
        return [a["name"] for a in self._attributes]

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "attributes": [dict(a) for a in self._attributes],
            "embedding_dim": self.embedding_dim,
            "condition_dim": self.condition_dim,
            "num_cross_layers": self.num_cross_layers,
        }


def attribute_layer_config(spec: FeatureSpec) -> list[dict[str, Any]]:
    """The spec's attributes as `ConditionEncoder` wants them (vocabularies read in)."""
    attributes = []
    for a in spec.attributes:
        if a.is_categorical:
            attributes.append(
                {
                    "name": a.name,
                    "kind": "categorical",
                    "vocabulary": spec.attribute_vocabulary(a.name),
                    "num_oov_buckets": a.num_oov_buckets,
                }
            )
        else:
            std = a.std if a.std and math.isfinite(a.std) and a.std > 0 else 1.0
            attributes.append({"name": a.name, "kind": "numeric", "mean": a.mean, "std": std,
                               "boundaries": list(a.boundaries)})
    return attributes


def bucket_count(attribute: Mapping[str, Any]) -> int:
    """Rows of an attribute's embedding (`attribute_layer_config`'s dict): known values plus
    OOV buckets, or a bucketised numeric's len(boundaries) + 1 buckets plus one for NaN;
    0 for a numeric attribute without boundaries."""
    if attribute["kind"] == "categorical":
        return len(attribute["vocabulary"]) + max(1, int(attribute.get("num_oov_buckets", 1)))
    boundaries = attribute.get("boundaries") or []
    return len(boundaries) + 2 if boundaries else 0


def embedding_size(num_values: int) -> int:
    """⌈6 · num_values^¼⌉, between 4 and 64: the rule of thumb from Google's feature-column
    guide, so a 2-value attribute gets 8 dimensions and a 10,000-value one 60, instead of
    one size for both (too many parameters for the first, too few for the second)."""
    return int(min(64, max(4, math.ceil(6 * num_values**0.25))))


def numeric_bucket(value: tf.Tensor, boundaries: list[float]) -> tf.Tensor:
    """`[batch]` float → `[batch]` int64 bucket: i for boundaries[i−1] ≤ v < boundaries[i]
    (TensorFlow's core Bucketize, so TF Serving runs it), len(boundaries) + 1 for NaN."""
    value = tf.cast(value, tf.float32)
    missing = tf.math.is_nan(value)
    bucket = tf.raw_ops.Bucketize(
        input=tf.where(missing, 0.0, value), boundaries=[float(b) for b in boundaries]
    )
    return tf.cast(tf.where(missing, len(boundaries) + 1, bucket), tf.int64)
