"""The attribute lift's counts, its leave-one-out scoring, and its choice on validation."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from recsys_cvae.config import ModelConfig
from recsys_cvae.model.cvae import build_model
from recsys_cvae.spec import FeatureSpec
from recsys_cvae.training.attribute_blend import (
    _validation_arrays,
    apply_lift,
    blend_lift,
    choose_counting_shape,
    count_buckets,
    held_out_term,
    lift_table,
    weighted_table,
)

SMALL = ModelConfig(latent_dim=4, hidden_dims=[8], condition_dim=5)


def test_lift_table_is_the_shrunk_log_ratio_of_segment_to_overall_popularity():
    # 2 items; one attribute with 2 buckets; bucket 0: item 0 twice, bucket 1: item 1 once.
    counts = np.array([[2.0, 0.0], [0.0, 1.0]])
    table = lift_table(counts, users=3, offsets={"a": 0}, sizes={"a": 2}, pseudo_users=1.0)
    popularity = (np.array([2.0, 1.0]) + 0.5) / (3.0 + 1.0)
    kappa = 1.0 * 3.0 / 3  # one pseudo user of mean length 1
    expected = np.log((counts + kappa * popularity[:, None]) / (counts.sum(0) + kappa))
    np.testing.assert_allclose(table, expected - np.log(popularity)[:, None], rtol=1e-6)
    assert table[0, 0] > 0 > table[1, 0]  # bucket 0 lifts item 0 and lowers item 1


def test_held_out_term_is_the_table_counted_without_the_user():
    rng = np.random.default_rng(0)
    x = (rng.random((6, 5)) < 0.5).astype(float)  # 6 users × 5 items
    bucket = np.array([0, 0, 1, 1, 1, 0])
    onehot = np.eye(2)[bucket]
    counts = x.T @ onehot
    term = held_out_term(counts, 6, {"a": 0}, {"a": 2}, 2.0, onehot, x)
    for u in range(6):
        # The popularity and κ stay those of all users; only the user's bucket loses them.
        without = counts.copy()
        without[:, bucket[u]] -= x[u]
        table = lift_table(counts, 6, {"a": 0}, {"a": 2}, 2.0)
        popularity = (counts.sum(1) + 0.5) / (counts.sum() + 0.5 * 5)
        kappa = 2.0 * counts.sum() / 6
        column = without[:, bucket[u]]
        expected = np.log((column + kappa * popularity) / (column.sum() + kappa)) - np.log(
            popularity)
        np.testing.assert_allclose(term[u], expected, rtol=1e-5)
        if x[u].any():  # a user with items sees their bucket without them
            assert not np.allclose(term[u], table[:, bucket[u]])


def test_the_blend_never_lowers_validation_and_the_refit_reapplies_it(features_dir):
    tf.keras.utils.set_random_seed(0)
    spec = FeatureSpec.load(features_dir)
    model = build_model(spec, SMALL)  # untrained: the lift and popularity must carry it
    chosen = blend_lift(model, spec, ["train"], "validation", 64, [3.0, 30.0], [0.5, 1.0],
                        "ndcg@10", [1.0, 0.0])
    assert chosen["validation_cold_ndcg@10"] > chosen["validation_cold_ndcg@10_before"]
    assert chosen["validation_ndcg@10"] >= chosen["validation_ndcg@10_before"]
    # What the model now computes is what was scored.
    arrays = _validation_arrays(model, spec, "validation", 64)
    lift = model.lift
    counts, counted = count_buckets(model, spec, ["train"], 64, fold_targets=False)
    table = weighted_table(counts, len(counted), lift, chosen["pseudo_users"],
                           chosen["attribute_weights"])
    np.testing.assert_allclose(lift.table.numpy(), table, rtol=1e-5)
    for name, offset in lift.offsets.items():  # each attribute's columns carry its weight
        plain = lift_table(counts, len(counted), lift.offsets, lift.sizes,
                           chosen["pseudo_users"])[:, offset:offset + lift.sizes[name]]
        np.testing.assert_allclose(table[:, offset:offset + lift.sizes[name]],
                                   chosen["attribute_weights"][name] * plain, rtol=1e-5)
    assert float(lift.decoder_weight.numpy()) == chosen["decoder_weight"]
    # A fresh model given the choice (the serving refit) gets the same weights and tables.
    fresh = build_model(spec, SMALL)
    apply_lift(fresh, spec, ["train"], 64, False, chosen)
    np.testing.assert_allclose(fresh.lift.table.numpy(), lift.table.numpy(), rtol=1e-6)
    np.testing.assert_allclose(fresh.lift.log_popularity.numpy(), lift.log_popularity.numpy())
    assert float(fresh.lift.cold_weight.numpy()) == chosen["cold_weight"]
    assert arrays["generate"].shape == (len(arrays["warm"]), spec.num_items)


def test_the_counting_shape_is_chosen_on_training_users_and_beats_popularity(features_dir):
    """The synthetic data plants taste on the attributes: counted leave-one-out on the
    training users, some attribute must earn a weight and beat plain popularity."""
    spec = FeatureSpec.load(features_dir)
    model = build_model(spec, SMALL)
    counts, counted = count_buckets(model, spec, ["train"], 64, fold_targets=False)
    shape = choose_counting_shape(model, spec, ["train"], 64, counts, len(counted),
                                  [3.0, 30.0], [0.5, 1.0], "ndcg@10")
    assert set(shape["attribute_weights"]) == set(model.lift.offsets)
    assert any(shape["attribute_weights"].values())
    assert shape["counted_ndcg@10"] > shape["counted_ndcg@10_popularity"]
    assert shape["pseudo_users"] in (3.0, 30.0)
