"""The ELBO's terms: closed-form Gaussian KL, the three reconstruction likelihoods, and the
multinomial's sampled-softmax estimate for training on large catalogues.

Every function takes `[batch, ...]` tensors and returns one value per example (`[batch]`),
so the caller can weight (β), average per replica (`tf.nn.compute_average_loss`) and track
them separately. Inputs are float32 even under mixed precision: the model computes its
logits in float32 because a softmax over tens of thousands of items loses too much in
float16.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

LIKELIHOODS = ("multinomial", "gaussian", "logistic")


def gaussian_kl(
    q_mean: tf.Tensor, q_log_var: tf.Tensor, p_mean: tf.Tensor, p_log_var: tf.Tensor
) -> tf.Tensor:
    """KL(N(q_mean, exp q_log_var) ‖ N(p_mean, exp p_log_var)) for diagonal Gaussians.

    All arguments `[batch, latent_dim]`; returns `[batch]` (summed over latent dimensions):
    ½ Σ_j [log σ²_p − log σ²_q + (σ²_q + (μ_q − μ_p)²) / σ²_p − 1].
    """
    per_dim = (
        p_log_var
        - q_log_var
        + (tf.exp(q_log_var) + tf.square(q_mean - p_mean)) * tf.exp(-p_log_var)
        - 1.0
    )
    return 0.5 * tf.reduce_sum(per_dim, axis=-1)


def multinomial_log_likelihood(x: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Σ_i x_i log softmax(logits)_i: `[batch, num_items]` each → `[batch]`.

    Mult-VAE's choice: items compete for a fixed budget of probability mass, which is what
    a top-k ranking needs (Liang et al., 2018, §2.1).
    """
    return tf.reduce_sum(x * tf.nn.log_softmax(logits, axis=-1), axis=-1)


def gaussian_log_likelihood(x: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """−½ Σ_i (x_i − logits_i)², unit variance, constants dropped: `[batch, num_items]` → `[batch]`.

    The decoder output is the mean of an independent Gaussian per item (a denoising
    autoencoder with squared error); every unobserved item counts as an observed 0.
    """
    return -0.5 * tf.reduce_sum(tf.square(x - logits), axis=-1)


def logistic_log_likelihood(x: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Σ_i x_i log σ(logits_i) + (1 − x_i) log(1 − σ(logits_i)): independent Bernoullis.

    `[batch, num_items]` each → `[batch]`; x may be fractional (rating/recency weights).
    """
    return -tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits), -1)


def log_likelihood(name: str, x: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """log p(x | logits) under the likelihood called `name` (one of LIKELIHOODS)."""
    if name == "multinomial":
        return multinomial_log_likelihood(x, logits)
    if name == "gaussian":
        return gaussian_log_likelihood(x, logits)
    if name == "logistic":
        return logistic_log_likelihood(x, logits)
    raise ValueError(f"model.likelihood must be one of {list(LIKELIHOODS)}, got {name!r}")


# ---- sampled softmax (training on large catalogues) -------------------------------------

SAMPLERS = ("log_uniform", "uniform")


def negative_log_expected_count(
    item_indices: tf.Tensor, num_items: int, num_samples: int, sampler: str
) -> tf.Tensor:
    """log(N · q(i)) for item indices `[m]` int: how often N draws from q expect item i.

    `log_uniform` is Zipf's law over the vocabulary order, q(i) = log((i + 2) / (i + 1)) /
    log(I + 1); the feature job writes the item vocabulary most frequent first, so this is a
    popularity-shaped proposal without item counts. `uniform` is q(i) = 1 / I.
    """
    if sampler == "uniform":
        log_q = tf.fill(tf.shape(item_indices), -math.log(num_items))
    elif sampler == "log_uniform":
        i = tf.cast(item_indices, tf.float32)
        log_q = tf.math.log(tf.math.log1p(1.0 / (i + 1.0)) / math.log(num_items + 1.0))
    else:
        raise ValueError(f"model.sampled_softmax_sampler must be one of {list(SAMPLERS)}, "
                         f"got {sampler!r}")
    return log_q + math.log(num_samples)


def sample_negatives(
    num_items: int, num_samples: int, sampler: str, seed: int | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """N item indices drawn with replacement from q, and their log(N · q): `[N]` each.

    Inverse-CDF draws in O(N) (no O(num_items) categorical): log-uniform is
    ⌊(I + 1)^u⌋ − 1 for u ~ U[0, 1), uniform is ⌊I · u⌋.
    """
    u = tf.random.uniform([num_samples], seed=seed)
    if sampler == "log_uniform":
        drawn = tf.cast(tf.exp(u * math.log(num_items + 1.0)), tf.int32) - 1
    elif sampler == "uniform":
        drawn = tf.cast(u * num_items, tf.int32)
    else:
        raise ValueError(f"model.sampled_softmax_sampler must be one of {list(SAMPLERS)}, "
                         f"got {sampler!r}")
    drawn = tf.clip_by_value(drawn, 0, num_items - 1)  # float rounding at u → 1
    return drawn, negative_log_expected_count(drawn, num_items, num_samples, sampler)


def sampled_multinomial_log_likelihood(
    x: tf.Tensor,
    positive_logits: tf.Tensor,
    sampled_logits: tf.Tensor,
    sampled_log_expected_count: tf.Tensor,
    sampled_is_positive: tf.Tensor,
) -> tf.Tensor:
    """The multinomial log-likelihood with the partition function estimated by sampling.

    Why: the full likelihood Σ_i x_i log softmax(l)_i = Σ_i x_i l_i − X log Z, with
    X = Σ_i x_i and Z = Σ_{j ∈ catalogue} exp(l_j), needs every item's logit, so the
    decoder's last layer costs batch × hidden × I per step. Split the catalogue into P, the
    union of the batch's history items (every x_i > 0 of every row is in P), and the rest R:

        Z = Σ_{j ∈ P} exp(l_j)  +  Σ_{j ∈ R} exp(l_j)

    The first sum is computed exactly (P's logits are needed for Σ x_i l_i anyway). The
    second is estimated from N draws s_1..s_N ~ q with replacement, shared by the batch:

        Ẑ_R = Σ_k [s_k ∉ P] · exp(l_{s_k}) / (N q(s_k))
            = Σ_k [s_k ∉ P] · exp(l_{s_k} − log N q(s_k))

    which is unbiased (E Ẑ_R = Z_R). So log Ẑ is a logsumexp over the columns
    [l_P, l_S − log N q_S], with draws that hit P ("accidental hits", already counted
    exactly) set to −∞; this is the logQ correction of sampled softmax (Jean et al., 2015;
    Bengio & Senécal, 2008). The result Σ_i x_i l_i − X log Ẑ is biased upwards a little
    (E log Ẑ ≤ log Z by Jensen; the bias shrinks as N grows), and its gradient with respect
    to the logits is the softmax over the candidate columns, an estimate of the full one.
    Another user's positives act as exact negatives for this user: popularity-weighted
    in-batch negatives at no extra cost.

    Relation to the full loss: when the draws enumerate R once each with N q = 1
    (`sampled_log_expected_count` = 0, P's items marked as hits), Ẑ = Z and this equals
    `multinomial_log_likelihood` exactly.

    Args:
      x: `[batch, p]` each row's weights on P's columns (0 where the row lacks the item).
      positive_logits: `[batch, p]` the logits of P's items.
      sampled_logits: `[batch, N]` the logits of the drawn items.
      sampled_log_expected_count: `[N]` log(N q(s_k)) of each draw.
      sampled_is_positive: `[N]` bool, the draw is an item of P.

    Returns: `[batch]` the estimated log-likelihood.
    """
    corrected = sampled_logits - sampled_log_expected_count[None, :]
    corrected = tf.where(sampled_is_positive[None, :], tf.constant(-math.inf), corrected)
    log_z = tf.reduce_logsumexp(tf.concat([positive_logits, corrected], axis=-1), axis=-1)
    return tf.reduce_sum(x * positive_logits, axis=-1) - tf.reduce_sum(x, axis=-1) * log_z


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


def reparametrise(mean: tf.Tensor, log_var: tf.Tensor) -> tf.Tensor:
    """z = μ + σ · ε, ε ~ N(0, I): a draw whose gradient reaches μ and log σ² (Kingma & Welling)."""
    return mean + tf.exp(0.5 * log_var) * tf.random.normal(tf.shape(mean))
