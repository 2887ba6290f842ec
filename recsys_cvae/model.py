"""The conditional VAE: p(items | history, attributes) with a conditional prior p(z | c).

Mult-VAE (Liang et al., 2018) models a user's history x as one draw from a multinomial over
the catalogue whose logits a decoder computes from a latent user z. This model conditions
all three parts on the user's attributes c (Sohn et al., 2015):

    c        = ConditionEncoder(attributes)           embeddings + numerics → DCN cross → Dense
    q(z|x,c) = N(μ, σ²)  from Encoder(x, c)           x L2-normalised, input dropout
    p(z|c)   = N(μ_p, σ_p²) from ConditionalPrior(c)  (N(0, I) when conditional_prior=False)
    logits   = Decoder(z, c) [+ x̃ · B]               B: optional EASE-style item-item branch
    p(x|z,c) = Multinomial(softmax(logits))           (Gaussian or logistic: model.likelihood)

    loss = −log p(x | z, c)  +  β · KL(q(z|x,c) ‖ p(z|c))  [+ l2 · ‖B‖²],  z ~ q (reparametrised)
           [+ w · −log p(x | z_p, c),  z_p ~ p(z|c)]   Sohn et al.'s hybrid (GSNN) term, w =
                                                       model.prior_reconstruction_weight

After training, `recsys_cvae.linear_blend` adds α · EASE's closed form to B, (λ, α) chosen on
validation (`model.linear_blend_lambdas`).

x is the multi-hot history, or the feature job's per-item `history_weights` (rating or
recency weights, aligned with the history ids) when the split has them and
`model.use_history_weights` is on. `recommend` ranks by the decoder at the posterior mean;
`generate` (cold start, what-if) decodes the prior mean from c alone. Lookups and
normalisation are layers built from the feature spec, so the exported graph takes the same
raw strings and floats tf.data yields.

Inputs (the serving contract): a dict with `history_item_ids` tf.string `[batch, n]`
("" padding, unknown ids ignored) and one `[batch]` tensor per attribute in spec order
(tf.string categorical, ""/unknown → OOV; tf.float32 numeric, NaN = unknown).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from recsys_cvae.config import ModelConfig
from recsys_cvae.layers import ConditionalPrior, Decoder, Encoder, ItemItemBranch
from recsys_cvae.losses import (  # noqa: F401  (re-exported: the model's public maths)
    LIKELIHOODS,
    SAMPLERS,
    gaussian_kl,
    log_likelihood,
    multinomial_log_likelihood,
    sample_negatives,
    sampled_multinomial_log_likelihood,
)
from recsys_cvae.preprocessing import (
    HISTORY_WEIGHTS,
    ConditionEncoder,
    ItemMultiHot,
    attribute_layer_config,
)
from recsys_cvae.spec import HISTORY, FeatureSpec

__all__ = [
    "CVAE",
    "ConditionalPrior",
    "Decoder",
    "Encoder",
    "ItemItemBranch",
    "build_model",
    "gaussian_kl",
    "load_trained_model",
    "multinomial_log_likelihood",
]

CONFIG_FILE = "config.json"
BEST_WEIGHTS = "best/weights"


class CVAE(tf.keras.Model):
    """The conditional Mult-VAE, trained with `fit`; the ELBO lives in `_elbo`.

    β (the KL weight) is a non-trainable variable that `train.BetaAnnealing` raises with
    `train_steps`, so the traced train step reads its current value instead of a frozen
    Python float; both are checkpointed, so a resumed run continues the schedule.
    With `use_condition=False` (or a spec without attributes) this is plain Mult-VAE.

    Example:

        model = build_model(FeatureSpec.load("W/features"), ModelConfig())
        logits = model.recommend_logits(batch)   # [batch, num_items]
    """

    def __init__(self, spec: FeatureSpec, config: ModelConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.model_config = config
        self._item_ids = tuple(spec.item_vocabulary())
        if len(self._item_ids) != spec.num_items:
            raise ValueError(
                f"{spec.path(spec.item_vocabulary_file)}: {len(self._item_ids)} items, but the "
                f"feature spec says {spec.num_items}"
            )
        self.uses_condition = bool(config.use_condition and spec.attributes)
        self.multi_hot = ItemMultiHot(list(self._item_ids))
        self.condition_encoder = None
        self.prior = None
        if self.uses_condition:
            self.condition_encoder = ConditionEncoder(
                attribute_layer_config(spec),
                config.embedding_dim,
                config.condition_dim,
                config.num_cross_layers,
            )
            if config.conditional_prior:
                self.prior = ConditionalPrior(config.latent_dim)
        if config.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"model.likelihood must be one of {list(LIKELIHOODS)}, got {config.likelihood!r}"
            )
        self.encoder = Encoder(
            config.hidden_dims, config.latent_dim, config.input_dropout, spec.num_items
        )
        self.decoder = Decoder(list(reversed(config.hidden_dims)), spec.num_items)
        if config.linear_init not in ("zeros", "ease"):
            raise ValueError(f"model.linear_init must be zeros or ease, got {config.linear_init!r}")
        self.item_item = None
        if 0 < spec.num_items <= config.linear_branch_max_items:
            self.item_item = ItemItemBranch(spec.num_items, config.linear_l2)
            self.linear_dropout = tf.keras.layers.Dropout(config.input_dropout)
        _check_sampled_softmax(config, spec.num_items, self.item_item is not None)
        self.beta = tf.Variable(
            0.0,
            trainable=False,
            name="beta",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        # Optimizer steps actually taken. `optimizer.iterations` also counts the probe step
        # Keras runs into the end of a dataset of unknown length; this does not.
        self.train_steps = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="train_steps",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = tf.keras.metrics.Mean(name="reconstruction")
        self.kl_tracker = tf.keras.metrics.Mean(name="kl")
        self.beta_tracker = tf.keras.metrics.Mean(name="beta")

    @property
    def item_ids(self) -> list[str]:
        """The item vocabulary in index order (column i of every logits tensor)."""
        return list(self._item_ids)

    @property
    def metrics(self) -> list[tf.keras.metrics.Metric]:
        return [self.loss_tracker, self.reconstruction_tracker, self.kl_tracker, self.beta_tracker]

    # ---- the parts -----------------------------------------------------------------------

    def history_mask(self, history_item_ids: tf.Tensor) -> tf.Tensor:
        """`[batch, n]` tf.string → `[batch, num_items]` float 0/1 of the known history items."""
        return self.multi_hot(history_item_ids)

    def history_indices(self, history_item_ids: tf.Tensor) -> tf.Tensor:
        """`[batch, n]` tf.string → `[batch, n]` int32 item indices, −1 for "" and unknown ids."""
        return tf.cast(self.multi_hot.index_lookup(history_item_ids), tf.int32) - 1

    def history_input(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """x `[batch, num_items]` float32: the history's weights, or its 0/1 mask.

        Weights (`history_weights`, `[batch, n]` aligned with the ids) are used when present
        and `use_history_weights` is on; a repeated id keeps its largest weight.
        """
        if self.model_config.use_history_weights and HISTORY_WEIGHTS in features:
            return self.multi_hot.weighted(features[HISTORY], features[HISTORY_WEIGHTS])
        return self.history_mask(features[HISTORY])

    def _history_weights(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
        """The examples' `history_weights` when the model uses them, else None (x is 0/1)."""
        if self.model_config.use_history_weights and HISTORY_WEIGHTS in features:
            return features[HISTORY_WEIGHTS]
        return None

    def history_sparse(self, features: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """x as (indices, values) `[batch, n]` each (see `ItemMultiHot.sparse`): the encoder's
        input, whose first layer then costs batch × n, not batch × num_items."""
        return self.multi_hot.sparse(features[HISTORY], self._history_weights(features))

    def history_both(
        self, features: Mapping[str, tf.Tensor]
    ) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
        """(`history_input`, `history_sparse`) from one lookup of the history ids: the train
        step needs both, and each alone would look the strings up again."""
        sparse = self.history_sparse(features)
        return self.multi_hot.dense(*sparse), sparse

    def _encode_sparse(
        self,
        features: Mapping[str, tf.Tensor],
        sparse: tuple[tf.Tensor, tf.Tensor],
        c: tf.Tensor | None,
        training: bool,
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """q(z|x,c)'s (mean, log-variance) from `history_sparse`'s x; a 0/1 x (no weights)
        takes the encoder's fast first layer (`layers.binary_history_product`)."""
        binary = self._history_weights(features) is None
        return self.encoder(sparse, c, training=training, binary=binary)

    def condition(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
        """c `[batch, condition_dim]`, or None for plain Mult-VAE."""
        return self.condition_encoder(features) if self.uses_condition else None

    def prior_params(
        self, c: tf.Tensor | None, batch_size: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Mean and log-variance of p(z|c), `[batch, latent_dim]` each (zeros for N(0, I))."""
        if self.prior is not None:
            return self.prior(c)
        zeros = tf.zeros([batch_size, self.model_config.latent_dim])
        return zeros, zeros

    def encode(self, features: Mapping[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """q(z|x,c) without dropout: (z_mean, z_log_var), each `[batch, latent_dim]`."""
        return self._encode_sparse(
            features, self.history_sparse(features), self.condition(features), training=False
        )

    # ---- what the signatures call ----------------------------------------------------------

    def call(self, features: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Reconstruction logits `[batch, num_items]`; z is sampled only when training."""
        return self._elbo(features, training=training)["logits"]

    def recommend_logits(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Scores from history + attributes at the posterior mean: `[batch, num_items]`.

        History items are not masked here; callers exclude them with `history_mask`.
        """
        c = self.condition(features)
        z_mean, _ = self._encode_sparse(features, self.history_sparse(features), c, False)
        if self.item_item is None:
            return self.decoder(z_mean, c)
        return self._logits(z_mean, c, self.history_input(features), training=False)

    def generate_logits(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Scores from attributes alone (cold start, what-if): decodes the prior mean.

        `features` needs only the attribute tensors. Without attributes (or with
        `use_condition=False`) every user gets the same scores; with no attributes at all
        the batch dimension cannot be known and the result is `[1, num_items]`.
        """
        # The item-item branch adds x · B = 0 for an empty history.
        return self.decoder.logits(self.decoder_state(features, from_history=False))

    def decoder_state(
        self, features: Mapping[str, tf.Tensor], from_history: bool = True
    ) -> tf.Tensor:
        """The decoder's last hidden layer h `[batch, units]` behind `recommend_logits`
        (from_history: the posterior mean) or `generate_logits` (the prior mean).

        Without the item-item branch those logits are h · Eᵀ + b, which lets
        `recsys_cvae.top_k` score the catalogue a block of E's rows at a time
        and never hold `[batch, num_items]`.
        """
        c = self.condition(features)
        if from_history:
            z, _ = self._encode_sparse(features, self.history_sparse(features), c, False)
            return self.decoder.hidden_state(z, c)
        if c is not None:
            batch_size = tf.shape(c)[0]
        elif self.spec.attributes:
            batch_size = tf.shape(tf.reshape(features[self.spec.attributes[0].name], [-1]))[0]
        else:
            batch_size = tf.constant(1)
        z, _ = self.prior_params(c, batch_size)
        return self.decoder.hidden_state(z, c)

    # ---- the ELBO and the Keras steps ------------------------------------------------------

    def _logits(
        self, z: tf.Tensor, c: tf.Tensor | None, x: tf.Tensor, training: bool
    ) -> tf.Tensor:
        """Decoder logits plus the item-item branch on the (dropped-out) input, float32."""
        return self._add_item_item(self.decoder(z, c), x, training)

    def _add_item_item(self, logits: tf.Tensor, x: tf.Tensor, training: bool) -> tf.Tensor:
        if self.item_item is not None:
            logits += self.item_item(self.linear_dropout(x, training=training))
        return logits

    def _posterior(
        self, features: Mapping[str, tf.Tensor], sparse: tuple[tf.Tensor, tf.Tensor],
        training: bool,
    ) -> tuple[tf.Tensor | None, tf.Tensor, tf.Tensor, tf.Tensor]:
        """(c, z_mean, z_log_var, z) of q(z|x,c): z is a reparametrised draw when training,
        the mean otherwise."""
        c = self.condition(features)
        z_mean, z_log_var = self._encode_sparse(features, sparse, c, training)
        return c, z_mean, z_log_var, _reparametrise(z_mean, z_log_var) if training else z_mean

    def _elbo(self, features: Mapping[str, tf.Tensor], training: bool) -> dict[str, tf.Tensor]:
        """Per-example terms (`[batch]`) and the logits (`[batch, num_items]`), float32."""
        x, sparse = self.history_both(features)
        c, z_mean, z_log_var, z = self._posterior(features, sparse, training)
        prior_mean, prior_log_var = self.prior_params(c, tf.shape(x)[0])
        kl = gaussian_kl(z_mean, z_log_var, prior_mean, prior_log_var)
        prior_rows = self._prior_rows(prior_mean, prior_log_var, training)
        if prior_rows is None or not training:
            logits = self._logits(z, c, x, training=training)
            terms = {
                "logits": logits,
                "reconstruction": -self._log_likelihood(x, sparse, logits),
                "kl": kl,
            }
            if prior_rows is not None:
                z_prior, m = prior_rows
                terms["prior_reconstruction"] = self._prior_term(
                    x, sparse, self.decoder(z_prior, c), m
                )
            return terms
        # Training with the prior-path term: one decoder pass and one likelihood over the
        # batch's posterior samples and its first m users' prior samples, stacked. One
        # matmul with the catalogue-sized layer (and one weight gradient) instead of two, and
        # the `[batch + m, num_items]` logits are never sliced: a slice's gradient writes a
        # zero-padded copy of the catalogue-wide tensor, once per slice. (Not outside
        # training: the logits there must equal `recommend_logits`' to the last bit.)
        z_prior, m = prior_rows
        batch_size = tf.shape(z)[0]
        logits = self.decoder(tf.concat([z, z_prior], 0), tf.concat([c, c[:m]], 0))
        if self.item_item is not None:
            branch = self.item_item(self.linear_dropout(x, training=training))
            logits += tf.pad(branch, [[0, m], [0, 0]])  # the prior rows see no history
        stacked_x = tf.concat([x, x[:m]], 0)  # pruned unless the likelihood is dense
        stacked_sparse = tuple(tf.concat([part, part[:m]], 0) for part in sparse)
        log_likelihood = self._log_likelihood(stacked_x, stacked_sparse, logits)
        return {
            "logits": logits[:batch_size],
            "reconstruction": -log_likelihood[:batch_size],
            "kl": kl,
            "prior_reconstruction": _spread_over_batch(
                -log_likelihood[batch_size:], batch_size, m
            ),
        }

    def _log_likelihood(
        self, x: tf.Tensor, sparse: tuple[tf.Tensor, ...], logits: tf.Tensor
    ) -> tf.Tensor:
        """log p(x | z, c) `[batch]`; the multinomial from the sparse x (the same value, without
        the passes over a dense `[batch, num_items]` x: `sparse_multinomial_log_likelihood`).
        Unused, the dense x is pruned from the traced step."""
        if self.model_config.likelihood == "multinomial":
            return sparse_multinomial_log_likelihood(*sparse, logits)
        return log_likelihood(self.model_config.likelihood, x, logits)

    def _prior_rows(
        self, prior_mean: tf.Tensor, prior_log_var: tf.Tensor, training: bool
    ) -> tuple[tf.Tensor, tf.Tensor] | None:
        """(z_p `[m, latent_dim]`, m) for the prior-path term, or None when it is off.

        The term is −log p(x | z_p, c) with z_p ~ p(z|c), Sohn et al.'s GSNN term. Why:
        `generate` decodes from the prior alone, but the ELBO trains the decoder only on
        posterior samples and reaches the prior only through the KL. Sohn et al. (2015,
        §4.2) add this term (their "hybrid" objective) so that the prior path itself
        predicts x well — which is exactly the cold-start question. Weighted by
        `model.prior_reconstruction_weight`; reparametrised, so p(z|c) learns from it.

        It costs decoder work. In training only the first m = ⌈f · batch⌉ users of the
        (shuffled) batch get it, f = `model.prior_reconstruction_fraction`, and `_prior_term`
        scales it by batch / m: the batch mean stays an unbiased estimate of the term's mean
        at a fraction f of its cost. Outside training: the prior mean of every user.
        """
        if self.model_config.prior_reconstruction_weight <= 0 or self.prior is None:
            return None
        batch_size = tf.shape(prior_mean)[0]
        if not training:
            return prior_mean, batch_size
        fraction = self.model_config.prior_reconstruction_fraction  # 0: unresolved, all
        m = batch_size
        if 0.0 < fraction < 1.0:
            m = tf.cast(tf.math.ceil(fraction * tf.cast(batch_size, tf.float32)), tf.int32)
            m = tf.clip_by_value(m, tf.minimum(1, batch_size), batch_size)
        return _reparametrise(prior_mean[:m], prior_log_var[:m]), m

    def _prior_term(
        self, x: tf.Tensor, sparse: tuple[tf.Tensor, ...], logits: tf.Tensor, m: tf.Tensor
    ) -> tf.Tensor:
        """`[batch]`: −log p(x | z_p, c) × batch / m for the first m users (`logits` are
        theirs, `[m, num_items]`), 0 for the rest (see `_prior_rows`)."""
        term = -self._log_likelihood(x[:m], tuple(part[:m] for part in sparse), logits)
        return _spread_over_batch(term, tf.shape(x)[0], m)

    def _sampled_elbo(
        self,
        features: Mapping[str, tf.Tensor],
        training: bool = True,
        negatives: tuple[tf.Tensor, tf.Tensor] | None = None,
    ) -> dict[str, tf.Tensor]:
        """Per-example terms (`[batch]`) with a sampled-softmax reconstruction (training only).

        The candidate columns are P, the union of the batch's history items, then N negatives
        drawn from `model.sampled_softmax_sampler`; the decoder's last layer is evaluated on
        those columns only (`Decoder.item_logits`: batch × units × (|P| + N) instead of
        batch × units × num_items) and `losses.sampled_multinomial_log_likelihood` corrects
        for the sampling (the maths is there). x on P's columns is `history_input`'s x:
        the largest weight of a repeated item, or 1. Validation (`test_step`) and serving
        keep the full softmax. The prior-path term (`model.prior_reconstruction_weight`)
        uses the same columns. `negatives` (item indices `[N]`, their log N·q `[N]`)
        replaces the draw, for tests.
        """
        # [batch, n] each: 1 + item index (0 = padding or a repeat), x's value there.
        sparse = indices, weights = self.history_sparse(features)
        c, z_mean, z_log_var, z = self._posterior(features, sparse, training)
        known = indices > 0
        positives, column = tf.unique(tf.boolean_mask(indices, known) - 1)  # P: [p] items
        rows = tf.broadcast_to(tf.range(tf.shape(indices)[0])[:, None], tf.shape(indices))
        x = tf.tensor_scatter_nd_max(  # [batch, p]
            tf.zeros([tf.shape(indices)[0], tf.size(positives)]),
            tf.stack([tf.boolean_mask(rows, known), column], axis=1),
            tf.boolean_mask(weights, known),
        )
        if negatives is None:
            negatives = sample_negatives(
                self.spec.num_items,
                self.model_config.sampled_softmax_negatives,
                self.model_config.sampled_softmax_sampler,
            )
        sampled, log_expected_count = negatives
        in_positives = tf.scatter_nd(
            positives[:, None], tf.ones_like(positives), [self.spec.num_items]
        )
        columns = tf.concat([positives, sampled], axis=0)
        is_hit = tf.gather(in_positives, sampled) > 0
        p = tf.size(positives)

        def log_likelihood_at(z: tf.Tensor, m: tf.Tensor | None = None) -> tf.Tensor:
            """For the first m users (all by default), z `[m, latent_dim]` being theirs."""
            rows = slice(None, m)
            hidden = self.decoder.hidden_state(z, None if c is None else c[rows])
            logits = self.decoder.item_logits(hidden, columns)
            return sampled_multinomial_log_likelihood(
                x[rows], logits[:, :p], logits[:, p:], log_expected_count, is_hit
            )

        prior_mean, prior_log_var = self.prior_params(c, tf.shape(indices)[0])
        terms = {
            "reconstruction": -log_likelihood_at(z),
            "kl": gaussian_kl(z_mean, z_log_var, prior_mean, prior_log_var),
        }
        prior_rows = self._prior_rows(prior_mean, prior_log_var, training)
        if prior_rows is not None:
            z_prior, m = prior_rows
            terms["prior_reconstruction"] = _spread_over_batch(
                -log_likelihood_at(z_prior, m), tf.shape(indices)[0], m
            )
        return terms

    def _loss_and_update(self, terms: dict[str, tf.Tensor]) -> tf.Tensor:
        per_example = terms["reconstruction"] + self.beta * terms["kl"]
        if "prior_reconstruction" in terms:
            per_example += self.model_config.prior_reconstruction_weight * terms[
                "prior_reconstruction"
            ]
        # Sums over this replica's examples and divides by the global batch (this batch's
        # size × replicas), so the all-reduced gradients are those of the global mean.
        loss = tf.nn.compute_average_loss(per_example)
        if self.item_item is not None:
            # A per-example penalty: divide by the replicas so the all-reduce sums to it once.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss += self.item_item.penalty() / replicas
        self.loss_tracker.update_state(per_example)
        self.reconstruction_tracker.update_state(terms["reconstruction"])
        self.kl_tracker.update_state(terms["kl"])
        # Per example, so the update waits for the batch like the others (see `train_steps`).
        self.beta_tracker.update_state(tf.ones_like(per_example) * self.beta)
        return loss

    def train_step(self, data: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        scaled = isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            if self.model_config.sampled_softmax_negatives > 0:
                terms = self._sampled_elbo(data)
            else:
                terms = self._elbo(data, training=True)
            loss = self._loss_and_update(terms)
            # Mixed precision: scale the loss up so float16 gradients do not underflow.
            target = self.optimizer.get_scaled_loss(loss) if scaled else loss
        gradients = tape.gradient(target, self.trainable_variables)
        if scaled:
            gradients = self.optimizer.get_unscaled_gradients(gradients)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        with tf.control_dependencies([loss]):
            self.train_steps.assign_add(1)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        self._loss_and_update(self._elbo(data, training=False))
        return {m.name: m.result() for m in self.metrics}


def sparse_multinomial_log_likelihood(
    indices: tf.Tensor, values: tf.Tensor, logits: tf.Tensor
) -> tf.Tensor:
    """`multinomial_log_likelihood` of the sparse x of `ItemMultiHot.sparse`, `[batch]`.

    indices, values `[batch, n]` (0 and value 0 = padding or a repeat, else 1 + the item's
    index and x there), logits `[batch, num_items]` float32:

        Σ_i x_i log softmax(l)_i = Σ_j values_j · l[indices_j − 1] − (Σ_j values_j) · log Σ_i e^l_i

    Why: the dense form multiplies, sums and differentiates a `[batch, num_items]` x that is
    almost all zeros. Here the only catalogue-wide work is the log-partition forward and
    its gradient (−Σx · softmax) backward, each one XLA-compiled pass or two over the
    logits; the history terms cost batch × n (a gather forward, a scatter backward).
    """
    positions = tf.maximum(indices - 1, 0)
    values = tf.cast(values, tf.float32)
    total = tf.reduce_sum(values, axis=-1)

    @tf.custom_gradient
    def log_likelihood_(logits: tf.Tensor) -> tuple[tf.Tensor, Any]:
        log_z = _log_partition(logits)
        picked = tf.gather(logits, positions, batch_dims=1)  # [batch, n]
        result = tf.reduce_sum(values * picked, axis=-1) - total * log_z

        def gradient(upstream: tf.Tensor) -> tf.Tensor:
            softmax_part = _scaled_softmax(logits, log_z, -(upstream * total))
            shape = tf.shape(positions)
            rows = tf.broadcast_to(tf.range(shape[0])[:, None], shape)
            pairs = tf.stack([rows, positions], axis=-1)
            return tf.tensor_scatter_nd_add(softmax_part, pairs, values * upstream[:, None])

        return result, gradient

    return log_likelihood_(logits)


@tf.function(jit_compile=True)
def _log_partition(logits: tf.Tensor) -> tf.Tensor:
    """log Σ_i e^logits_i per row, `[batch]`, stable (shifted by the row's max).

    Compiled by XLA, on CPUs too: TensorFlow's ops would write the shifted logits and their
    exponentials as two more `[batch, num_items]` tensors; XLA fuses them into the sum.
    Its shapes do not depend on the history length, so it compiles once per batch size.
    """
    shift = tf.reduce_max(logits, axis=-1)
    return tf.math.log(tf.reduce_sum(tf.exp(logits - shift[:, None]), axis=-1)) + shift


@tf.function(jit_compile=True)
def _scaled_softmax(logits: tf.Tensor, log_z: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """softmax(logits) · scale per row, `[batch, num_items]`: one fused pass (`_log_partition`)."""
    return tf.exp(logits - log_z[:, None]) * scale[:, None]


def _reparametrise(mean: tf.Tensor, log_var: tf.Tensor) -> tf.Tensor:
    """z = μ + σ · ε, ε ~ N(0, I): a draw whose gradient reaches μ and log σ² (Kingma & Welling)."""
    return mean + tf.exp(0.5 * log_var) * tf.random.normal(tf.shape(mean))


def _spread_over_batch(term: tf.Tensor, batch_size: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
    """`[batch]` from the first m users' `[m]` term: × batch / m, then 0 for the rest, so the
    batch mean of the result is an unbiased estimate of the term's mean (`_prior_rows`)."""
    scale = tf.cast(batch_size, term.dtype) / tf.cast(tf.maximum(m, 1), term.dtype)
    return tf.pad(term * scale, [[0, batch_size - m]])


def _check_sampled_softmax(config: ModelConfig, num_items: int, has_item_item: bool) -> None:
    negatives = config.sampled_softmax_negatives
    if negatives < 0:
        raise ValueError(
            f"model.sampled_softmax_negatives must be 0 (off) or a number of negatives, "
            f"got {negatives}"
        )
    if negatives == 0:
        return
    if config.likelihood != "multinomial":
        raise ValueError(
            f"model.sampled_softmax_negatives needs model.likelihood = multinomial, "
            f"got {config.likelihood!r}"
        )
    if config.sampled_softmax_sampler not in SAMPLERS:
        raise ValueError(
            f"model.sampled_softmax_sampler must be one of {list(SAMPLERS)}, "
            f"got {config.sampled_softmax_sampler!r}"
        )
    if has_item_item:
        raise ValueError(
            f"model.sampled_softmax_negatives needs the item-item branch off: set "
            f"model.linear_branch_max_items below {num_items} (this catalogue's size)"
        )


def dummy_features(spec: FeatureSpec, batch_size: int = 1) -> dict[str, tf.Tensor]:
    """A batch of all-unknown users (empty history, unknown attributes), to build variables."""
    features = {HISTORY: tf.fill([batch_size, 1], "")}
    for a in spec.attributes:
        features[a.name] = (
            tf.fill([batch_size], "") if a.is_categorical else tf.fill([batch_size], math.nan)
        )
    return features


def build_model(spec: FeatureSpec, config: ModelConfig) -> CVAE:
    """A CVAE with all variables created (call under `strategy.scope()` when distributing)."""
    model = CVAE(spec, config)
    features = dummy_features(spec)
    model(features)
    model.generate_logits(features)
    return model


def load_trained_model(model_dir: str) -> CVAE:
    """Rebuilds the model from `model_dir/config.json` and restores the best weights.

    `config.json` is the resolved config `train` wrote, with `features_dir` recorded: the
    feature spec and vocabularies there rebuild the lookup layers exactly.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path}: no config.json; train a model into {model_dir} first")
    with tf.io.gfile.GFile(path) as f:
        data = json.load(f)
    try:
        model_config = ModelConfig(**data["model"])
        features_dir = data["features_dir"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a config written by `recsys-cvae train` ({error})") from None
    weights = os.path.join(model_dir, BEST_WEIGHTS)
    if not tf.io.gfile.exists(weights + ".index"):
        raise FileNotFoundError(f"{weights}: no best weights; training did not finish an epoch")
    model = build_model(FeatureSpec.load(features_dir), model_config)
    model.load_weights(weights).expect_partial()
    return model
