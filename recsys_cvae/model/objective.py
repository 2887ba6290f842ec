"""The CVAE's training objective: the ELBO (full or sampled softmax), its loss and Keras steps.

Why apart from `cvae.py`: the architecture (encoder, prior, decoder, item-item branch) and
what serving calls (`recommend_logits`, `generate_logits`, `encode`) are read by everyone who
exports or serves the model; the objective only by those who change how it learns. This is a
mixin of `CVAE`: it uses the model's layers and inputs (`history_both`, `history_sparse`,
`_posterior`, `prior_params`, `_logits`, `decoder`, `item_item`, `linear_dropout`, `spec`,
`model_config`, the loss trackers, `beta`, `train_steps` and `gradient_dtype`), all defined there.

    loss = −log p(x | z, c)  +  β · KL(q(z|x,c) ‖ p(z|c))  [+ l2 · ‖B‖²]
           [+ w · −log p(x | z_p, c),  z_p ~ p(z|c)]   (Sohn et al.'s hybrid term)
"""

from __future__ import annotations

from collections.abc import Mapping

import tensorflow as tf

from recsys_cvae.config import ModelConfig
from recsys_cvae.model.gradient_exchange import replicas, sum_over_replicas
from recsys_cvae.model.losses import (
    SAMPLERS,
    gaussian_kl,
    log_likelihood,
    reparametrise,
    sample_negatives,
    sampled_multinomial_log_likelihood,
    sparse_multinomial_log_likelihood,
)


class ElboObjective:
    """`train_step` and `test_step` of the CVAE over its per-example ELBO terms."""

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
        return reparametrise(prior_mean[:m], prior_log_var[:m]), m

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
            # A per-example penalty: divide by the replicas so the all-reduce sums to it once
            # (a gathered gradient is not all-reduced: every replica adds it whole).
            shares = 1 if self.item_item.gathers_gradient() else replicas()
            loss += self.item_item.penalty() / shares
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
        distributed = replicas() > 1
        if distributed:
            gathered = self.item_item is not None and self.item_item.gathers_gradient()
            presummed = [gathered and v is self.item_item.weights_matrix
                         for v in self.trainable_variables]  # fmt: skip
            gradients = sum_over_replicas(gradients, presummed, self.gradient_dtype)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables),
                                       skip_gradients_aggregation=distributed)
        with tf.control_dependencies([loss]):
            self.train_steps.assign_add(1)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        self._loss_and_update(self._elbo(data, training=False))
        return {m.name: m.result() for m in self.metrics}


def _spread_over_batch(term: tf.Tensor, batch_size: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
    """`[batch]` from the first m users' `[m]` term: × batch / m, then 0 for the rest, so the
    batch mean of the result is an unbiased estimate of the term's mean (`_prior_rows`)."""
    scale = tf.cast(batch_size, term.dtype) / tf.cast(tf.maximum(m, 1), term.dtype)
    return tf.pad(term * scale, [[0, batch_size - m]])


def check_sampled_softmax(config: ModelConfig, num_items: int, has_item_item: bool) -> None:
    """Refuses sampled-softmax settings that cannot work, at build time, with the field."""
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
