"""The CVAE: preprocessing layers, the ELBO terms and the serving-facing methods.

(The preprocessing layers live in `recsys_cvae/model/preprocessing.py`; they are tested here
because the model is their only user.)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from recsys_cvae.config import ModelConfig
from recsys_cvae.model.cvae import build_model
from recsys_cvae.model.layers import ConditionalPrior, Decoder, Encoder, ItemItemBranch
from recsys_cvae.model.losses import (
    gaussian_kl,
    gaussian_log_likelihood,
    log_likelihood,
    logistic_log_likelihood,
    multinomial_log_likelihood,
)
from recsys_cvae.model.preprocessing import (
    HISTORY_WEIGHTS,
    ConditionEncoder,
    ItemMultiHot,
    embedding_size,
)
from tests.builders import write_tiny_features

SMALL = ModelConfig(latent_dim=4, hidden_dims=[8], embedding_dim=3, condition_dim=5)


def features(history, regions, ages):
    return {
        "history_item_ids": tf.constant(history, tf.string),
        "region": tf.constant(regions, tf.string),
        "age": tf.constant(ages, tf.float32),
    }


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    return write_tiny_features(str(tmp_path_factory.mktemp("tiny")))


def test_item_multi_hot_ignores_padding_unknown_ids_and_duplicates():
    layer = ItemMultiHot(["a", "b", "c"])
    x = layer(tf.constant([["b", "", "zz", "b"], ["c", "a", "", ""]]))
    # Row 1: only "b" is known (once); row 2: "a" and "c".
    np.testing.assert_array_equal(x.numpy(), [[0, 1, 0], [1, 0, 1]])
    assert layer(tf.zeros([2, 0], tf.string)).shape == (2, 3)


def test_condition_encoder_treats_missing_values_as_learnable_unknowns():
    attributes = [
        {"name": "region", "kind": "categorical", "vocabulary": ["n", "s"], "num_oov_buckets": 1},
        {"name": "age", "kind": "numeric", "mean": 40.0, "std": 10.0},
    ]
    layer = ConditionEncoder(attributes, embedding_dim=2, condition_dim=3, num_cross_layers=1)
    c = layer({"region": tf.constant(["n", "", "mars"]), "age": tf.constant([50.0, np.nan, 40.0])})
    assert c.shape == (3, 3)
    assert np.isfinite(c.numpy()).all()
    # "" and "mars" share the single OOV bucket; age NaN is 0 plus the missing flag.
    lookup = layer.lookups["region"]
    np.testing.assert_array_equal(lookup(tf.constant(["", "mars", "n", "s"])).numpy(), [0, 0, 1, 2])
    with pytest.raises(KeyError, match="no attribute 'age'"):
        layer({"region": tf.constant(["n"])})


def test_condition_encoder_buckets_numeric_values_at_the_spec_boundaries():
    # Bucketize's rule: bucket i holds boundaries[i-1] <= v < boundaries[i]; NaN has its own.
    attributes = [{"name": "age", "kind": "numeric", "mean": 40.0, "std": 10.0,
                   "boundaries": [25.0, 40.0, 60.0]}]
    layer = ConditionEncoder(attributes, embedding_dim=0, condition_dim=3, num_cross_layers=1)
    ages = tf.constant([10.0, 25.0, 39.9, 40.0, 75.0, np.nan])
    buckets = layer.bucket_indices({"age": ages})["age"].numpy()
    np.testing.assert_array_equal(buckets, [0, 1, 1, 2, 3, 4])
    assert layer({"age": ages}).shape == (6, 3)
    # 3 boundaries: 4 buckets plus NaN's, embedded in ceil(6 * 5 ** 0.25) = 9 dimensions.
    assert layer.embeddings["age"].output_dim == 9
    assert embedding_size(2) == 8 and embedding_size(10**8) == 64


def test_condition_encoder_without_boundaries_keeps_the_scalar_only():
    attributes = [{"name": "age", "kind": "numeric", "mean": 40.0, "std": 10.0}]
    layer = ConditionEncoder(attributes, embedding_dim=0, condition_dim=3, num_cross_layers=1)
    assert layer.bucket_indices({"age": tf.constant([1.0])}) == {}
    assert layer({"age": tf.constant([1.0, np.nan])}).shape == (2, 3)


@pytest.mark.parametrize(
    "layer",
    [
        ItemMultiHot(["a", "b"]),
        ConditionEncoder(
            [{"name": "r", "kind": "categorical", "vocabulary": ["x"], "num_oov_buckets": 2}],
            embedding_dim=2,
            condition_dim=3,
            num_cross_layers=2,
        ),
        Encoder([8, 4], latent_dim=2, input_dropout=0.3),
        ConditionalPrior(latent_dim=2),
        Decoder([4, 8], num_items=5),
        ItemItemBranch(num_items=5, l2=0.1),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_layer_config_round_trips(layer):
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config


def test_kl_closed_form_matches_a_known_value_and_monte_carlo():
    # KL(N(1, 1) ‖ N(0, 1)) = ½ (0 − 0 + (1 + 1)/1 − 1) = 0.5 in one dimension.
    kl = gaussian_kl(
        tf.constant([[1.0]]), tf.constant([[0.0]]), tf.constant([[0.0]]), tf.zeros([1, 1])
    )
    assert kl.numpy() == pytest.approx([0.5])

    q_mean, q_log_var = np.array([0.3, -1.0]), np.log([0.5, 2.0])
    p_mean, p_log_var = np.array([0.0, 0.5]), np.log([1.5, 0.8])
    closed = gaussian_kl(
        *(tf.constant([v], tf.float64) for v in (q_mean, q_log_var, p_mean, p_log_var))
    )
    z = np.random.default_rng(0).normal(q_mean, np.exp(0.5 * q_log_var), size=(200_000, 2))

    def log_density(z, mean, log_var):
        return -0.5 * (np.log(2 * math.pi) + log_var + (z - mean) ** 2 / np.exp(log_var)).sum(-1)

    monte_carlo = np.mean(log_density(z, q_mean, q_log_var) - log_density(z, p_mean, p_log_var))
    assert closed.numpy()[0] == pytest.approx(monte_carlo, abs=0.01)


def test_multinomial_log_likelihood_counts_only_the_history_items():
    # Uniform logits over 4 items: each item has log-probability log(1/4); two are in x.
    x = tf.constant([[1.0, 0.0, 1.0, 0.0]])
    value = multinomial_log_likelihood(x, tf.zeros([1, 4]))
    assert value.numpy() == pytest.approx([2 * math.log(0.25)])


def test_methods_give_the_contract_shapes(tiny_spec):
    model = build_model(tiny_spec, SMALL)
    batch = features([["a", "b"], ["zz", ""]], ["north", ""], [30.0, np.nan])
    assert model.item_ids == ["a", "b", "c"]
    assert model(batch).shape == (2, 3)
    assert model.recommend_logits(batch).shape == (2, 3)
    assert model.generate_logits({k: batch[k] for k in ("region", "age")}).shape == (2, 3)
    z_mean, z_log_var = model.encode(batch)
    assert z_mean.shape == z_log_var.shape == (2, 4)
    np.testing.assert_array_equal(
        model.history_mask(batch["history_item_ids"]), [[1, 1, 0], [0, 0, 0]]
    )


def test_recommend_ignores_unknown_ids_and_is_the_deterministic_call(tiny_spec):
    model = build_model(tiny_spec, SMALL)
    known = features([["a", ""]], ["south"], [45.0])
    with_unknown = features([["a", "zz"]], ["south"], [45.0])
    np.testing.assert_array_equal(
        model.recommend_logits(known), model.recommend_logits(with_unknown)
    )
    np.testing.assert_allclose(model(known, training=False), model.recommend_logits(known))
    # Training samples z (and drops inputs), so two training calls differ.
    assert not np.allclose(model(known, training=True), model(known, training=True))


def test_generate_depends_on_attributes_only_when_conditioned(tiny_spec):
    north = features([[""]], ["north"], [30.0])
    south = features([[""]], ["south"], [30.0])
    model = build_model(tiny_spec, SMALL)
    assert not np.allclose(model.generate_logits(north), model.generate_logits(south))
    np.testing.assert_array_equal(model.generate_logits(north), model.generate_logits(north))

    plain = build_model(tiny_spec, ModelConfig(latent_dim=4, hidden_dims=[8], use_condition=False))
    assert plain.condition_encoder is None and plain.prior is None
    np.testing.assert_array_equal(plain.generate_logits(north), plain.generate_logits(south))


def test_unconditional_prior_is_the_standard_normal(tiny_spec):
    model = build_model(
        tiny_spec, ModelConfig(latent_dim=4, hidden_dims=[8], conditional_prior=False)
    )
    mean, log_var = model.prior_params(model.condition(features([[""]], ["north"], [1.0])), 1)
    np.testing.assert_array_equal(mean, np.zeros((1, 4)))
    np.testing.assert_array_equal(log_var, np.zeros((1, 4)))


def test_methods_trace_inside_a_tf_function(tiny_spec):
    model = build_model(tiny_spec, SMALL)
    signature = {
        "history_item_ids": tf.TensorSpec([None, None], tf.string),
        "region": tf.TensorSpec([None], tf.string),
        "age": tf.TensorSpec([None], tf.float32),
    }

    @tf.function(input_signature=[signature])
    def recommend(batch):
        return model.recommend_logits(batch), model.generate_logits(batch), model.encode(batch)[0]

    batch = features([["c", ""], ["b", "a"], ["", ""]], ["north", "south", "x"], [1.0, 2.0, np.nan])
    scores, generated, z_mean = recommend(batch)
    np.testing.assert_allclose(scores, model.recommend_logits(batch), atol=1e-6)
    assert generated.shape == (3, 3) and z_mean.shape == (3, 4)


def test_gaussian_and_logistic_likelihoods_match_their_formulas():
    x = tf.constant([[1.0, 0.0, 0.5]])
    logits = tf.constant([[2.0, -1.0, 0.0]])
    # −½ Σ (x − μ)² = −½ (1 + 1 + 0.25)
    assert gaussian_log_likelihood(x, logits).numpy() == pytest.approx([-1.125])
    p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.0])))
    expected = np.log(p[0]) + np.log(1 - p[1]) + 0.5 * np.log(p[2]) + 0.5 * np.log(1 - p[2])
    assert logistic_log_likelihood(x, logits).numpy() == pytest.approx([expected], rel=1e-5)
    with pytest.raises(ValueError, match="model.likelihood must be one of"):
        log_likelihood("poisson", x, logits)


@pytest.mark.parametrize("likelihood", ["multinomial", "gaussian", "logistic"])
def test_every_likelihood_gives_the_elbo_it_names(tiny_spec, likelihood):
    model = build_model(tiny_spec, ModelConfig(**{**SMALL.__dict__, "likelihood": likelihood}))
    batch = features([["a", "b"], ["c", ""]], ["north", ""], [30.0, np.nan])
    terms = model._elbo(batch, training=False)
    x = model.history_mask(batch["history_item_ids"])
    expected = -log_likelihood(likelihood, x, terms["logits"])
    np.testing.assert_allclose(terms["reconstruction"], expected, rtol=1e-6)


def test_item_item_branch_has_a_zero_diagonal_and_adds_x_times_b(tiny_spec):
    config = ModelConfig(**{**SMALL.__dict__, "linear_branch_max_items": 3, "linear_l2": 0.5})
    model = build_model(tiny_spec, config)
    branch = model.item_item
    branch.weights_matrix.assign(tf.reshape(tf.range(1.0, 10.0), [3, 3]))
    np.testing.assert_array_equal(branch.matrix().numpy(), [[0, 2, 3], [4, 0, 6], [7, 8, 0]])
    batch = features([["a", "b"]], ["north"], [30.0])
    c = model.condition(batch)
    z_mean, _ = model.encode(batch)
    # x = [1, 1, 0] → x·B = [4, 2, 9] on top of the latent path.
    np.testing.assert_allclose(
        model.recommend_logits(batch) - model.decoder(z_mean, c), [[4, 2, 9]], rtol=1e-6
    )
    assert float(branch.penalty()) == pytest.approx(0.5 * sum(v * v for v in (2, 3, 4, 6, 7, 8)))
    # Too large a catalogue for the threshold: no branch.
    too_small = ModelConfig(**{**SMALL.__dict__, "linear_branch_max_items": 2})
    assert build_model(tiny_spec, too_small).item_item is None


def test_history_weights_replace_the_multi_hot_when_present(tiny_spec):
    model = build_model(tiny_spec, SMALL)
    batch = features([["a", "c", "a", ""]], ["north"], [30.0])
    weighted = {**batch, HISTORY_WEIGHTS: tf.constant([[0.5, 2.0, 0.25, 9.0]])}
    # A repeated id keeps its largest weight; the padding's weight is ignored.
    np.testing.assert_allclose(model.history_input(weighted), [[0.5, 0.0, 2.0]])
    np.testing.assert_allclose(model.history_input(batch), [[1.0, 0.0, 1.0]])
    assert not np.allclose(model.recommend_logits(weighted), model.recommend_logits(batch))
    off = build_model(tiny_spec, ModelConfig(**{**SMALL.__dict__, "use_history_weights": False}))
    np.testing.assert_allclose(off.history_input(weighted), [[1.0, 0.0, 1.0]])


def test_mixed_precision_computes_in_float16_with_float32_logits_and_trains(tiny_spec):
    from recsys_cvae.training.dataset import make_dataset

    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        config = ModelConfig(**{**SMALL.__dict__, "linear_branch_max_items": 3})
        model = build_model(tiny_spec, config)
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(tf.keras.optimizers.Adam(1e-2))
        model.compile(optimizer=optimizer)
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    assert model.encoder.first_condition.compute_dtype == "float16"
    assert model.encoder.history_kernel.dtype == tf.float32
    batch = features([["a", "b"]], ["north"], [30.0])
    assert model.recommend_logits(batch).dtype == tf.float32
    before = model.decoder.logits.kernel.numpy().copy()
    history = model.fit(make_dataset(tiny_spec, "train", batch_size=2), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(before, model.decoder.logits.kernel.numpy())


def test_without_conditioning_the_model_is_mult_vae(tiny_spec):
    config = ModelConfig(**{**SMALL.__dict__, "use_condition": False})
    model = build_model(tiny_spec, config)
    batch = features([["a", "b"], ["c", ""]], ["north", "south"], [30.0, 50.0])
    names = {v.name.split("/")[0] for v in model.trainable_variables}
    assert not any("condition" in n or "prior" in n for n in names)
    terms = model._elbo(batch, training=False)
    # Mult-VAE's ELBO: multinomial reconstruction and KL to N(0, I), attributes ignored.
    x = model.history_mask(batch["history_item_ids"])
    z_mean, z_log_var = model.encoder(x, None)
    np.testing.assert_allclose(terms["logits"], model.decoder(z_mean, None), rtol=1e-6)
    zeros = tf.zeros_like(z_mean)
    # The step encodes the sparse history, this the dense one: equal up to summation order.
    kl = gaussian_kl(z_mean, z_log_var, zeros, zeros)
    np.testing.assert_allclose(terms["kl"], kl, rtol=1e-6, atol=1e-7)
    other = {**batch, "region": tf.constant(["south", "north"])}
    np.testing.assert_array_equal(model.recommend_logits(batch), model.recommend_logits(other))


def test_the_sparse_encoder_input_equals_the_dense_one(tiny_spec):
    model = build_model(tiny_spec, SMALL)
    # Duplicates, padding, unknown ids and weights: the sparse form keeps a repeated item's
    # first position with its largest weight, so the encoder sees exactly the dense row.
    batch = features([["c", "a", "c", "zz", ""], ["", "", "", "", ""]], ["north", ""], [1.0, 2.0])
    batch[HISTORY_WEIGHTS] = tf.constant([[0.5, 2.0, 3.0, 9.0, 9.0], [1.0] * 5])
    indices, values = model.history_sparse(batch)
    np.testing.assert_array_equal(indices.numpy()[0], [3, 1, 0, 0, 0])
    np.testing.assert_array_equal(values.numpy()[0], [3.0, 2.0, 0.0, 0.0, 0.0])
    dense = np.zeros((2, 4))
    np.add.at(dense, (np.arange(2)[:, None].repeat(5, 1), indices.numpy()), values.numpy())
    np.testing.assert_allclose(dense[:, 1:], model.history_input(batch), rtol=1e-6)
    c = model.condition(batch)
    sparse = model.encoder((indices, values), c)
    for sparse_part, dense_part in zip(sparse, model.encoder(model.history_input(batch), c)):
        np.testing.assert_allclose(sparse_part, dense_part, rtol=1e-5, atol=1e-6)


def test_the_binary_first_layer_equals_the_weighted_one_with_its_gradient(tiny_spec):
    """0/1 histories take `binary_history_product` (segment sums), weighted ones
    `sparse_dense_matmul`: for all-1 values both must give the same layer and W gradient."""
    model = build_model(tiny_spec, SMALL)
    batch = features([["c", "a", "c", "zz", ""], ["b", "", "", "", ""], [""] * 5],
                     ["north", "", "south"], [1.0, 2.0, 3.0])
    sparse = model.history_sparse(batch)
    c = model.condition(batch)
    model.encoder(sparse, c)
    kernel = model.encoder.history_kernel

    def first_layer(binary):
        with tf.GradientTape() as tape:
            z_mean, z_log_var = model.encoder(sparse, c, binary=binary)
            loss = tf.reduce_sum(tf.sin(z_mean)) + tf.reduce_sum(tf.cos(z_log_var))
        return z_mean, tape.gradient(loss, kernel)

    (fast, fast_gradient), (general, general_gradient) = first_layer(True), first_layer(False)
    np.testing.assert_allclose(fast, general, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        tf.convert_to_tensor(fast_gradient), tf.convert_to_tensor(general_gradient),
        rtol=1e-5, atol=1e-7,
    )
    # The padding row (unknown ids, repeats, "") gets no gradient.
    np.testing.assert_array_equal(tf.convert_to_tensor(fast_gradient)[0], 0.0)


def test_the_binary_first_layer_drops_items_and_keeps_the_expectation():
    """Input dropout on the fast path: each item kept with probability 1 − rate and scaled by
    1 / (1 − rate), so the layer's mean over draws is the layer without dropout."""
    from recsys_cvae.model.layers import binary_history_product

    kernel = tf.random.stateless_normal([6, 3], [1, 2])
    indices = tf.constant([[1, 2, 3, 5], [4, 0, 0, 0]])
    exact = binary_history_product(indices, tf.ones([2, 4], tf.bool), kernel, 1.0)
    expected = np.stack([kernel.numpy()[[1, 2, 3, 5]].sum(0) / 2.0, kernel.numpy()[4]])
    np.testing.assert_allclose(exact, expected, rtol=1e-6)
    draws = [
        binary_history_product(indices, tf.random.stateless_uniform([2, 4], [3, i]) >= 0.5,
                               kernel, 2.0)
        for i in range(4000)
    ]
    np.testing.assert_allclose(np.mean(draws, axis=0), expected, atol=0.08)
    # A dropped item is gone: some draw has row 1 (one item) all zero.
    assert any(np.all(d.numpy()[1] == 0) for d in draws[:20])


def test_prior_reconstruction_trains_the_generate_path_through_the_prior(tiny_spec):
    """Sohn et al.'s GSNN term: −log p(x | z_p, c) added with its weight, and the only way,
    with β = 0, that the reconstruction loss reaches p(z|c)'s weights."""
    batch = features([["a", "b"], ["c", ""]], ["north", "south"], [30.0, 50.0])

    def prior_gradients(weight):
        config = ModelConfig(**{**SMALL.__dict__, "prior_reconstruction_weight": weight})
        model = build_model(tiny_spec, config)
        model.beta.assign(0.0)
        with tf.GradientTape() as tape:
            terms = model._elbo(batch, training=False)
            loss = model._loss_and_update(terms)
        gradients = tape.gradient(loss, model.prior.trainable_variables)
        return terms, loss, [g for g in gradients if g is not None]

    terms, loss, gradients = prior_gradients(2.0)
    expected = tf.reduce_mean(terms["reconstruction"] + 2.0 * terms["prior_reconstruction"])
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-6)
    assert gradients and any(float(tf.reduce_max(tf.abs(g))) > 0 for g in gradients)
    terms, _, gradients = prior_gradients(0.0)
    assert "prior_reconstruction" not in terms
    assert all(float(tf.reduce_max(tf.abs(g))) == 0 for g in gradients)


def test_prior_reconstruction_on_a_fraction_of_the_batch_is_rescaled(tiny_spec):
    """With fraction f the first m = ⌈f·batch⌉ users carry the term × batch/m, the rest 0."""
    batch = features(
        [["a", ""], ["b", ""], ["c", ""], ["a", "c"]], ["north"] * 4, [30.0, 40.0, 50.0, 60.0]
    )
    config = ModelConfig(**{**SMALL.__dict__, "prior_reconstruction_fraction": 0.25})
    model = build_model(tiny_spec, config)
    x, sparse = model.history_both(batch)
    c = model.condition(batch)
    mean, _ = model.prior_params(c, 4)
    certain = tf.fill(tf.shape(mean), -80.0)  # σ ≈ 0: the training sample is the mean

    def term(training):
        z, m = model._prior_rows(mean, certain, training=training)
        return model._prior_term(x, sparse, model.decoder(z, c[:m]), m).numpy()

    sampled, every_user = term(training=True), term(training=False)
    assert sampled.shape == (4,) and np.all(sampled[1:] == 0)
    assert sampled[0] == pytest.approx(4.0 * every_user[0], rel=1e-5)
    assert np.all(every_user > 0)
    assert model._elbo(batch, training=True)["prior_reconstruction"].shape == (4,)


def test_the_condition_skip_feeds_c_to_the_output_layer_beside_h(tiny_spec):
    config = dataclasses.replace(SMALL, condition_skip=True)
    model = build_model(tiny_spec, config)
    # E has a column per hidden unit and per condition dimension: logits = [h; c] · Eᵀ + b.
    assert model.decoder.logits.kernel.shape == (tiny_spec.num_items, 8 + 5)
    batch = features([["a"], [""]], ["north", "south"], [30.0, np.nan])
    h = model.decoder_state(batch, from_history=False)
    c = model.condition(batch)
    np.testing.assert_allclose(h[:, 8:].numpy(), c.numpy())
    np.testing.assert_allclose(
        model.generate_logits(batch).numpy(), model.decoder.logits(h).numpy(), rtol=1e-6
    )
    # Without attributes there is no c to add: the plain decoder.
    plain = build_model(tiny_spec, dataclasses.replace(config, use_condition=False))
    assert plain.decoder.logits.kernel.shape == (tiny_spec.num_items, 8)
