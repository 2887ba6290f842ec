"""The attribute lift: its tables' place in the logits, the budget, and the chunked top-K."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from recsys_cvae.config import ModelConfig
from recsys_cvae.model.attribute_lift import (
    AttributeLift,
    coarse_buckets,
    lift_columns,
    lift_sizes,
)
from recsys_cvae.model.catalogue_top_k import catalogue_top_k
from recsys_cvae.model.cvae import build_model
from tests.builders import write_tiny_features

SMALL = ModelConfig(latent_dim=4, hidden_dims=[8], embedding_dim=3, condition_dim=5,
                    linear_branch_max_items=0)


def test_lift_sizes_drop_the_largest_attributes_until_the_tables_fit():
    counts = {"region": 4, "zip": 1000, "age": 0, "device": 5}
    assert lift_sizes(counts, num_items=100, max_cells=10**6) == {"region": 4, "zip": 1000,
                                                                  "device": 5}
    assert lift_sizes(counts, num_items=100, max_cells=1000) == {"region": 4, "device": 5}
    assert lift_sizes(counts, num_items=100, max_cells=10) == {}


def test_the_lift_adds_its_weighted_bucket_columns():
    lift = AttributeLift({"a": 2, "b": 3}, num_items=4)
    table = np.arange(20, dtype=np.float32).reshape(4, 5)
    lift.table.assign(table)
    lift.cold_weight.assign(0.5)
    buckets = {"a": tf.constant([1, 0]), "b": tf.constant([2, 0])}
    np.testing.assert_allclose(lift.multi_hot(buckets).numpy(),
                               [[0, 1, 0, 0, 1], [1, 0, 1, 0, 0]])
    expected = 0.5 * np.stack([table[:, [1, 4]].sum(1), table[:, [0, 2]].sum(1)])
    np.testing.assert_allclose(lift(buckets, cold=True).numpy(), expected)
    np.testing.assert_allclose(lift(buckets, cold=False).numpy(), 0.0)  # warm weight is 0


def test_numeric_attributes_are_also_counted_in_merged_buckets():
    # ten quantile buckets (nine boundaries) and NaN -> four merged buckets and NaN
    attributes = [{"name": "age", "kind": "numeric", "boundaries": list(range(9))},
                  {"name": "tenure", "kind": "numeric", "boundaries": [1.0, 2.0]},
                  {"name": "region", "kind": "categorical", "vocabulary": ["n", "s"]}]
    coarse = coarse_buckets(attributes, {"age": 11, "tenure": 4, "region": 3}, groups=4)
    assert coarse == {"age/4": ("age", [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4])}  # tenure: 3 ≤ 4
    assert coarse_buckets(attributes, {"region": 3}, groups=4) == {}  # age not covered
    assert coarse_buckets(attributes, {"age": 11}, groups=0) == {}
    lift = AttributeLift({"age": 11, "age/4": 5}, num_items=2, coarse=coarse)
    hot = lift.multi_hot({"age": tf.constant([0, 4, 9, 10], tf.int64)}).numpy()
    assert [list(np.flatnonzero(row)) for row in hot] == [[0, 11], [4, 12], [9, 14], [10, 15]]
    assert AttributeLift.from_config(lift.get_config()).coarse == lift.coarse
    # the merged columns count against the tables' budget like any attribute
    counts = {"age": 11, "tenure": 4, "region": 3}
    assert lift_columns(attributes, counts, 10, 230, 4) == (
        {"age": 11, "tenure": 4, "region": 3, "age/4": 5}, coarse)
    assert lift_columns(attributes, counts, 10, 229, 4) == (counts, {})


def test_generate_and_recommend_carry_their_own_weights(tmp_path):
    spec = write_tiny_features(str(tmp_path))
    model = build_model(spec, SMALL)
    features = {"history_item_ids": tf.constant([["a"], [""]]),
                "region": tf.constant(["north", "south"]), "age": tf.constant([30.0, np.nan])}
    generated, recommended = model.generate_logits(features), model.recommend_logits(features)
    rng = np.random.default_rng(0)
    model.lift.table.assign(rng.normal(size=model.lift.table.shape).astype(np.float32))
    model.lift.cold_weight.assign(2.0)
    lifted = model.generate_logits(features) - generated
    buckets = model.condition_encoder.bucket_indices(features)
    np.testing.assert_allclose(
        lifted.numpy(), 2.0 * model.lift.multi_hot(buckets).numpy() @ model.lift.table.numpy().T,
        rtol=1e-5, atol=1e-5,
    )
    np.testing.assert_allclose(model.recommend_logits(features).numpy(), recommended.numpy())


def test_the_chunked_top_k_ranks_the_lift_like_the_whole_catalogue(tmp_path):
    tf.keras.utils.set_random_seed(0)
    spec = write_tiny_features(str(tmp_path))
    model = build_model(spec, SMALL)
    rng = np.random.default_rng(1)
    model.lift.table.assign(5 * rng.normal(size=model.lift.table.shape).astype(np.float32))
    model.lift.cold_weight.assign(1.0)
    model.lift.warm_weight.assign(0.5)
    features = {"history_item_ids": tf.constant([["a", ""], ["", ""], ["b", "c"]]),
                "region": tf.constant(["north", "south", "x"]),
                "age": tf.constant([30.0, np.nan, 70.0])}
    for from_history in (True, False):
        whole = catalogue_top_k(model, features, 1, chunk_size=0, from_history=from_history)
        chunked = catalogue_top_k(model, features, 1, chunk_size=1, from_history=from_history,
                                  one_piece_max_logits=0)
        np.testing.assert_array_equal(whole[1].numpy(), chunked[1].numpy())
        np.testing.assert_allclose(whole[0].numpy(), chunked[0].numpy(), rtol=1e-5, atol=1e-5)
