"""Per-attribute item lifts added to the CVAE's logits: a closed-form, validated wide term.

Why: a cold user's only evidence is their attributes, and the strongest simple answer to
"what do users like this one take" is counting: popularity within each attribute value.
The best single segmentation is a baseline the CVAE's `generate` must beat, and combining
every attribute's counts (naive Bayes in log space, each shrunk towards popularity) is
stronger than any one of them. The decoder at the prior mean learns the same signal
through a 200-dimensional bottleneck and the KL; this term hands it over exactly:

    recommend: logits(i | x, c) = decoder + γ_w · Σ_a lift_a[v_a(c), i]
    generate:  logits(i | c)    = δ · decoder + η · log p(i) + γ_c · Σ_a lift_a[v_a(c), i]

    lift_a[v, i] = log p̂(i | a = v) − log p(i)
    p̂(i | a = v) = (n_{v,i} + κ · p(i)) / (N_v + κ)           κ = pseudo users × mean length

Why δ and η for `generate`: the decoder at the prior mean decodes one typical user of the
segment, sharper than the segment's average taste; on MovieLens-100K it ranked below plain
popularity for attribute-only users. A product of experts with a tempered decoder
(δ < 1) and log-popularity (η) lets validation choose how much of each; δ = 1, η = 0,
γ = 0 is the trained model unchanged.

with v_a(c) the attribute's bucket (`ConditionEncoder.bucket_indices`: a categorical value
or OOV bucket, a numeric quantile bucket). The tables are counted after training, each
attribute's columns scaled by a weight chosen on the training users leave-one-out, and γ
is chosen on validation separately for `generate` (`cold_weight`, with η = γ: the blend
treats log p(i) + Σ_a lift_a as one counting term) and `recommend` (`warm_weight`), γ = 0
included (`recsys_cvae.training.attribute_blend`), so the term can only help on validation.
Both live in the model's weights: checkpoints, the export and TF Serving carry them with
no new input.

The table is item-major (`[num_items, buckets]`, like the decoder's output rows), so the
chunked top-K scores a block of items from a block of rows (`catalogue_top_k`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf


class AttributeLift(tf.keras.layers.Layer):
    """γ · Σ_a lift_a[v_a] `[batch, num_items]` from the attributes' bucket indices.

    Args:
      sizes: attribute name → number of buckets, in the order of the table's columns
        (coarse columns included).
      num_items: the catalogue's size.
      coarse: column name → (attribute, fine bucket → coarse bucket): a numeric attribute
        counted again at a coarser resolution (`coarse_buckets`), derived here from the
        attribute's own bucket so the serving signature is unchanged.

    Weights (non-trainable, set by `attribute_blend`): `table` `[num_items, Σ sizes]`,
    `log_popularity` `[num_items]`, the scalars `cold_weight` (γ_c), `warm_weight` (γ_w),
    `decoder_weight` (δ, 1 until set) and `popularity_weight` (η): at their initial values
    the logits are the decoder's.
    """

    def __init__(
        self, sizes: Mapping[str, int], num_items: int,
        coarse: Mapping[str, tuple[str, list[int]]] | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(dtype="float32", **kwargs)
        self.sizes = dict(sizes)
        self.coarse = {name: (source, list(mapping))
                       for name, (source, mapping) in (coarse or {}).items()}
        self.num_items = num_items
        self.offsets, total = {}, 0
        for name, size in self.sizes.items():
            self.offsets[name] = total
            total += size
        self.num_buckets = total
        self.table = self.add_weight(
            name="table", shape=[num_items, total], initializer="zeros", trainable=False
        )
        self.cold_weight = self.add_weight(
            name="cold_weight", shape=[], initializer="zeros", trainable=False
        )
        self.warm_weight = self.add_weight(
            name="warm_weight", shape=[], initializer="zeros", trainable=False
        )
        self.log_popularity = self.add_weight(
            name="log_popularity", shape=[num_items], initializer="zeros", trainable=False
        )
        self.decoder_weight = self.add_weight(
            name="decoder_weight", shape=[], initializer="ones", trainable=False
        )
        self.popularity_weight = self.add_weight(
            name="popularity_weight", shape=[], initializer="zeros", trainable=False
        )

    def multi_hot(self, buckets: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """`[batch, Σ sizes]` float32: one 1 per attribute, at its bucket's column."""
        columns = tf.stack(
            [tf.cast(self._bucket(buckets, name), tf.int32) + offset
             for name, offset in self.offsets.items()],
            axis=1,
        )  # [batch, attributes]
        return tf.reduce_sum(tf.one_hot(columns, self.num_buckets), axis=1)

    def _bucket(self, buckets: Mapping[str, tf.Tensor], name: str) -> tf.Tensor:
        if name not in self.coarse:
            return buckets[name]
        source, mapping = self.coarse[name]
        return tf.gather(tf.constant(mapping, tf.int64), tf.cast(buckets[source], tf.int64))

    def state(self, buckets: Mapping[str, tf.Tensor], cold: bool) -> tf.Tensor:
        """γ · multi-hot `[batch, Σ sizes]`: the logits' term is this · tableᵀ."""
        weight = self.cold_weight if cold else self.warm_weight
        return self.multi_hot(buckets) * weight

    def call(self, buckets: Mapping[str, tf.Tensor], cold: bool) -> tf.Tensor:
        """The lift term alone, `[batch, num_items]` (γ · multi-hot · tableᵀ)."""
        return tf.matmul(self.state(buckets, cold), tf.convert_to_tensor(self.table),
                         transpose_b=True)

    def combine(
        self, decoder_logits: tf.Tensor, buckets: Mapping[str, tf.Tensor], cold: bool
    ) -> tf.Tensor:
        """The signature's logits from the decoder's (module docstring)."""
        lifted = self(buckets, cold)
        if not cold:
            return decoder_logits + lifted
        return (self.decoder_weight * decoder_logits
                + self.popularity_weight * self.log_popularity + lifted)

    def get_config(self) -> dict[str, Any]:
        config = {**super().get_config(), "sizes": self.sizes, "num_items": self.num_items,
                  "coarse": self.coarse}
        config.pop("dtype", None)
        return config


def lift_sizes(
    bucket_counts: Mapping[str, int], num_items: int, max_cells: int
) -> dict[str, int]:
    """The attributes the lift covers (name → buckets, spec order): every attribute with
    buckets, leaving out the largest until num_items × Σ buckets ≤ max_cells."""
    sizes = {name: n for name, n in bucket_counts.items() if n > 0}
    while sizes and num_items * sum(sizes.values()) > max_cells:
        del sizes[max(sizes, key=lambda name: (sizes[name], name))]
    return sizes


def lift_columns(
    attributes: list[Mapping[str, Any]], bucket_counts: Mapping[str, int], num_items: int,
    max_cells: int, groups: int,
) -> tuple[dict[str, int], dict[str, tuple[str, list[int]]]]:
    """(`sizes`, `coarse`) for `AttributeLift`: the attributes `lift_sizes` keeps, then each
    `coarse_buckets` column group that still fits num_items × Σ sizes ≤ max_cells."""
    sizes = lift_sizes(bucket_counts, num_items, max_cells)
    coarse = {}
    for name, (source, mapping) in coarse_buckets(attributes, sizes, groups).items():
        size = len(set(mapping))
        if num_items * (sum(sizes.values()) + size) <= max_cells:
            sizes[name], coarse[name] = size, (source, mapping)
    return sizes, coarse


def coarse_buckets(
    attributes: list[Mapping[str, Any]], covered: Mapping[str, int], groups: int
) -> dict[str, tuple[str, list[int]]]:
    """`name/groups` → (name, fine → coarse bucket) for every bucketised numeric attribute
    the lift covers with more than `groups` value buckets: adjacent quantile buckets merged
    into `groups`, the NaN bucket kept apart (index `groups`).

    Why: the spec's ten quantile buckets suit the condition encoder, but counted per bucket
    they are thin (ML-100K: ~85 training users each). Which resolution the counts can carry
    is left to the leave-one-out shape choice, which weighs each column group on its own.
    Measured offline on six ML-100K splits (counting term alone, shape chosen leave-one-out):
    age in deciles 0.5416 cold NDCG@10, deciles with their quartile merge 0.5474.
    """
    maps = {}
    if groups < 2:
        return maps
    for attribute in attributes:
        name, boundaries = attribute["name"], attribute.get("boundaries") or []
        values = len(boundaries) + 1  # buckets of known values; one more for NaN
        if attribute["kind"] != "numeric" or name not in covered or values <= groups:
            continue
        maps[f"{name}/{groups}"] = (name, [b * groups // values for b in range(values)]
                                    + [groups])
    return maps
