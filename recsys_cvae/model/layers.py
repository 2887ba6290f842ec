"""The CVAE's trainable parts: encoder q(z|x,c), prior p(z|c), decoder p(x|z,c), item-item branch.

Mixed precision: hidden layers follow the global Keras policy (float16 compute under
`mixed_float16`), while the layers whose outputs enter the loss — the posterior and prior
parameters, the decoder logits and the item-item branch — are pinned to float32, so the
KL, the softmax over the catalogue and the loss are computed in float32.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from recsys_cvae.model.gradient_exchange import gathered_item_item, replicas


class Encoder(tf.keras.layers.Layer):
    """q(z | x, c): the normalised history (and c) → posterior mean and log-variance.

    L2 normalisation makes long and short histories comparable; input dropout (Mult-VAE's
    denoising) makes the model infer held-out items from the rest.

    Inputs: x, either dense `[batch, num_items]` or sparse — (indices, values), each
    `[batch, n]`, from `ItemMultiHot.sparse` (index 0 = padding, unknown or repeated, 1 + item
    index otherwise) — and c `[batch, condition_dim]` or None. `binary=True` says the sparse
    values are all 1 (no history weights), which lets the first layer take its fast path.
    Input dropout drops items. Outputs: z_mean, z_log_var, each `[batch, latent_dim]` float32.

    Why sparse: the first layer's x·W costs batch × num_items × units as a dense matmul, but
    only batch × n × units as a sparse product with the n history rows of W (n ≈ 150 of 27k items
    on ML-20M), and its gradient touches only those rows. Both forms use the same variables
    (`history_kernel` `[num_items + 1, units]`, row 0 for padding) and give the same result.
    """

    def __init__(
        self,
        hidden_dims: list[int],
        latent_dim: int,
        input_dropout: float,
        num_items: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_dims = list(hidden_dims)
        self.latent_dim = latent_dim
        self.input_dropout = input_dropout
        self.num_items = num_items
        self.dropout = tf.keras.layers.Dropout(input_dropout)
        first = self.hidden_dims[0] if self.hidden_dims else 2 * latent_dim
        self.first_units = first
        activation = "tanh" if self.hidden_dims else None
        # x·W_x + c·W_c + b: W_x is `history_kernel`, W_c this Dense (built only when there is
        # a c), b `first_bias`.
        self.first_condition = tf.keras.layers.Dense(first, use_bias=False)
        self.first_activation = tf.keras.layers.Activation(activation or "linear")
        self.hidden = [tf.keras.layers.Dense(d, activation="tanh") for d in self.hidden_dims[1:]]
        self.mean = tf.keras.layers.Dense(latent_dim, dtype="float32")
        self.log_var = tf.keras.layers.Dense(latent_dim, dtype="float32")
        self.history_kernel = None

    def _kernel(self, num_items: int) -> tf.Variable:
        if self.history_kernel is None:
            self.num_items = self.num_items or num_items
            self.history_kernel = self.add_weight(
                name="history_kernel",
                shape=[self.num_items + 1, self.first_units],
                initializer="glorot_uniform",
            )
            self.first_bias = self.add_weight(
                name="first_bias", shape=[self.first_units], initializer="zeros"
            )
        return self.history_kernel

    def call(
        self, x: Any, c: tf.Tensor | None, training: bool = False, binary: bool = False
    ) -> tuple[tf.Tensor, tf.Tensor]:
        if isinstance(x, (tuple, list)):
            indices, values = x
            kernel = self._kernel(self.num_items)
            if binary:
                # Mult-VAE's input dropout: drop items, scale the kept ones by 1 / (1 − rate).
                kept = self.dropout(tf.ones_like(values, tf.float32), training=training) > 0
                rate = self.input_dropout if training else 0.0
                h = binary_history_product(
                    indices, kept, kernel, 1.0 / (1.0 - rate), fast_gradient=training
                )
                h = tf.cast(h, self.compute_dtype)
            else:
                # Normalised in float32: in float16 the epsilon underflows (0/0 for no history).
                values = tf.cast(values, tf.float32)
                squares = tf.reduce_sum(tf.square(values), -1)  # ‖x‖²: no item is repeated
                norm = tf.sqrt(tf.maximum(squares, 1e-12))[:, None]
                values = self.dropout(values / norm, training=training)
                values = tf.cast(values, self.compute_dtype)
                h = tf.sparse.sparse_dense_matmul(_sparse_x(indices, values, kernel), kernel)
        else:
            kernel = self._kernel(int(x.shape[-1]))
            h = tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1)
            h = tf.cast(self.dropout(h, training=training), self.compute_dtype)
            h = tf.matmul(h, kernel[1:])
        h = h + tf.cast(self.first_bias, h.dtype)
        if c is not None:
            h = h + self.first_condition(tf.cast(c, h.dtype))
        h = self.first_activation(h)
        for layer in self.hidden:
            h = layer(h)
        return self.mean(h), self.log_var(h)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "hidden_dims": self.hidden_dims,
            "latent_dim": self.latent_dim,
            "input_dropout": self.input_dropout,
            "num_items": self.num_items,
        }


def binary_history_product(
    indices: tf.Tensor, kept: tf.Tensor, kernel: tf.Tensor, scale: float,
    fast_gradient: bool = True,
) -> tf.Tensor:
    """x̃ · W for a 0/1 history x: x̃ = x / ‖x‖ on the kept positions × `scale`, else 0.

    indices `[batch, n]` (1 + item index, 0 = padding; no item twice in a row), kept
    `[batch, n]` bool (input dropout's mask), kernel W `[num_items + 1, units]` → `[batch,
    units]` float32. ‖x‖ = √(number of history items), taken before dropout.

    Why: every kept value of a row is the same, so the product is a sum of W's history rows
    times one number per row: `tf.sparse.segment_sum`, which reads the rows where they lie.
    Its gradient Wᵀ-side, dW = x̃ᵀ · dh, is the same sum the other way round (dh's rows
    summed into each history item's row, positions sorted by item). On ML-20M shapes the
    pair takes ~35 ms where `sparse_dense_matmul` and its gradient take ~115 ms
    (`benchmarks/bench_train.py`); weighted histories keep `sparse_dense_matmul`.
    `fast_gradient=False` (inference: validation, the export) leaves the custom gradient
    out, so no SavedModel carries a function whose gradient it cannot save.
    """
    known = indices > 0
    count = tf.reduce_sum(tf.cast(known, tf.float32), axis=-1)
    row_scale = scale / tf.sqrt(tf.maximum(count, 1e-12))  # no history: nothing to scale
    positions = tf.where(known & kept)  # [k, 2], row-major: rows ascending, as segment ids
    rows = tf.cast(positions[:, 0], tf.int32)
    items = tf.gather_nd(indices, positions)
    batch_size = tf.shape(indices)[0]

    if not fast_gradient:
        summed = tf.sparse.segment_sum(kernel, items, rows, num_segments=batch_size)
        return tf.cast(summed, tf.float32) * row_scale[:, None]

    @tf.custom_gradient
    def history_rows_sum(kernel: tf.Tensor) -> tuple[tf.Tensor, Any]:
        summed = tf.sparse.segment_sum(kernel, items, rows, num_segments=batch_size)

        def gradient(upstream: tf.Tensor) -> tf.Tensor:
            by_item = tf.argsort(items, stable=True)
            return tf.sparse.segment_sum(
                upstream,
                tf.gather(rows, by_item),
                tf.gather(items, by_item),
                num_segments=tf.shape(kernel)[0],
            )

        return summed, gradient

    summed = history_rows_sum(tf.convert_to_tensor(kernel))
    return tf.cast(summed, tf.float32) * row_scale[:, None]


def _sparse_x(indices: tf.Tensor, values: tf.Tensor, kernel: tf.Tensor) -> tf.SparseTensor:
    """x `[batch, num_items + 1]` as a SparseTensor of the known positions (index > 0).

    Why: `sparse_dense_matmul(x, W)` costs nnz × units both ways (nnz = the batch's known
    history positions), and its gradient is W's dense gradient xᵀ · dh with only the
    history rows non-zero. A gather of the `[batch, n]` rows and an einsum pay for the
    padding too (real batches are padded to their longest history: several times the mean),
    and autodiff of the gather materialises the `[batch, n, units]` outer product and hands
    Adam `[batch · n, units]` slices to deduplicate: ~3× slower on ML-20M shapes
    (`benchmarks/bench_train.py`). For weighted histories; 0/1 ones take
    `binary_history_product`.
    """
    known = tf.where(indices > 0)  # [nnz, 2] (row, position): padding and unknown ids dropped
    items = tf.cast(tf.gather_nd(indices, known), tf.int64)
    shape = tf.cast(tf.stack([tf.shape(indices)[0], tf.shape(kernel)[0]]), tf.int64)
    return tf.SparseTensor(
        tf.stack([known[:, 0], items], axis=1), tf.gather_nd(values, known), shape
    )


class ConditionalPrior(tf.keras.layers.Layer):
    """p(z | c): where users with these attributes sit in latent space.

    Why: it lets `generate` answer for a user with no history at all (decode the prior mean),
    and the KL term pulls each posterior towards its attribute group instead of the origin.
    Input c `[batch, condition_dim]`; outputs mean, log-variance `[batch, latent_dim]` float32.
    """

    def __init__(self, latent_dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.latent_dim = latent_dim
        self.mean = tf.keras.layers.Dense(latent_dim, dtype="float32")
        self.log_var = tf.keras.layers.Dense(
            latent_dim, kernel_initializer="zeros", dtype="float32"
        )

    def call(self, c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return self.mean(c), self.log_var(c)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "latent_dim": self.latent_dim}


class ItemLogits(tf.keras.layers.Layer):
    """The decoder's output layer, logits = h · Eᵀ + b, one row of E per item.

    Why rows and not a Dense kernel `[units, num_items]`: E `[num_items, units]` holds each
    item's output embedding contiguously, so the logits of a subset of items (sampled
    softmax) gather m rows and the gradient is m sparse rows, and a chunk of the catalogue
    (chunked top-K) is a contiguous block. Gathering columns of a Dense kernel is a strided
    gather whose dense, transposed gradient took ~3× as long as the rows' on a 100k-item
    catalogue (600 units, 9k columns). Float32 always (the softmax over the catalogue).

    Input h `[batch, units]`; output `[batch, num_items]` float32.
    """

    def __init__(self, num_items: int, **kwargs: Any) -> None:
        super().__init__(dtype="float32", **kwargs)
        self.num_items = num_items

    def build(self, input_shape: tf.TensorShape) -> None:
        self.kernel = self.add_weight(
            name="kernel", shape=[self.num_items, int(input_shape[-1])],
            initializer="glorot_uniform",
        )
        self.bias = self.add_weight(name="bias", shape=[self.num_items], initializer="zeros")
        super().build(input_shape)

    def call(self, h: tf.Tensor) -> tf.Tensor:
        return self.rows(h, self.kernel, self.bias)

    @staticmethod
    def rows(h: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
        """h · kernelᵀ + bias for some rows of E (`kernel` `[m, units]`, `bias` `[m]`)."""
        logits = tf.matmul(tf.cast(h, tf.float32), tf.cast(kernel, tf.float32), transpose_b=True)
        return tf.nn.bias_add(logits, tf.cast(bias, tf.float32))

    def get_config(self) -> dict[str, Any]:
        config = {**super().get_config(), "num_items": self.num_items}
        config.pop("dtype", None)
        return config


class Decoder(tf.keras.layers.Layer):
    """p(x | z, c): a latent user (and c) → logits over the catalogue.

    Inputs: z `[batch, latent_dim]`, c `[batch, condition_dim]` or None.
    Output: logits `[batch, num_items]` float32 (the likelihood's natural parameters).

    With `condition_skip`, c also reaches the output layer directly, beside the last hidden
    layer: logits = [h; c] · Eᵀ + b. Why: a wide, linear path from the attributes to every
    item's logit (popularity within a segment is exactly such a term) that the tanh layers
    need not learn; and it stays one output layer, so chunked top-K and sampled softmax work
    on it unchanged.
    """

    def __init__(
        self, hidden_dims: list[int], num_items: int, condition_skip: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hidden_dims = list(hidden_dims)
        self.num_items = num_items
        self.condition_skip = condition_skip
        self.hidden = [tf.keras.layers.Dense(d, activation="tanh") for d in self.hidden_dims]
        self.logits = ItemLogits(num_items)

    def call(self, z: tf.Tensor, c: tf.Tensor | None) -> tf.Tensor:
        return self.logits(self.hidden_state(z, c))

    def hidden_state(self, z: tf.Tensor, c: tf.Tensor | None) -> tf.Tensor:
        """h `[batch, units]`, the last hidden layer's output: the logits are h · Eᵀ + b."""
        h = z if c is None else tf.concat([z, tf.cast(c, z.dtype)], axis=-1)
        for layer in self.hidden:
            h = layer(h)
        if self.condition_skip and c is not None:
            h = tf.concat([h, tf.cast(c, h.dtype)], axis=-1)
        return h

    def item_logits(self, h: tf.Tensor, item_indices: tf.Tensor) -> tf.Tensor:
        """The logits of some items only, `[batch, m]` float32, for item indices `[m]`
        (sampled softmax: batch × units × m instead of batch × units × num_items).

        Gathers from a plain read of E, not from the variable: a `ResourceGather` would put
        E in copy-on-read mode, and every later dense read (Adam, validation, serving in
        the same process) would copy all of it. The gradient is still m sparse rows.
        """
        kernel = tf.convert_to_tensor(self.logits.kernel)
        bias = tf.convert_to_tensor(self.logits.bias)
        return self.logits.rows(h, tf.gather(kernel, item_indices), tf.gather(bias, item_indices))

    def get_config(self) -> dict[str, Any]:
        config = {"hidden_dims": self.hidden_dims, "num_items": self.num_items,
                  "condition_skip": self.condition_skip}
        return {**super().get_config(), **config}


class ItemItemBranch(tf.keras.layers.Layer):
    """EASE-style linear branch: logits += x · B with B `[num_items, num_items]`, diag(B) = 0.

    Why: on small and medium catalogues a linear item-item model (EASE, Steck 2019) ranks
    better than a low-rank decoder, and the two are complementary (the latent path carries
    attributes and smooths sparse users; B carries exact item-to-item co-occurrence). The
    zero diagonal stops the trivial solution "predict each item from itself". Trained
    jointly through the same likelihood, on the dropped-out input (a denoising linear
    autoencoder, Steck 2020), with an L2 penalty `l2 · ‖B‖²` per example (EASE's λ / users).
    Memory grows as num_items², so the model only builds it up to
    `model.linear_branch_max_items` items.

    Input x `[batch, num_items]`; output `[batch, num_items]` float32.
    """

    def __init__(self, num_items: int, l2: float, **kwargs: Any) -> None:
        super().__init__(dtype="float32", **kwargs)
        self.num_items = num_items
        self.l2 = l2
        # Set by training when several replicas should exchange this gradient as its
        # factors, sent in this dtype (`gradient_exchange.gathered_item_item`); None: the
        # matrix is all-reduced. Not part of the saved config.
        self.gather_dtype: tf.DType | None = None

    def build(self, input_shape: tf.TensorShape) -> None:
        self.weights_matrix = self.add_weight(
            name="item_item", shape=[self.num_items, self.num_items], initializer="zeros"
        )
        super().build(input_shape)

    def matrix(self) -> tf.Tensor:
        """B with its diagonal forced to zero, `[num_items, num_items]`."""
        return tf.linalg.set_diag(self.weights_matrix, tf.zeros([self.num_items]))

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.cast(x, tf.float32)
        if self.gathers_gradient():
            return gathered_item_item(x, self.matrix(), self.gather_dtype)
        return tf.matmul(x, self.matrix())

    def gathers_gradient(self) -> bool:
        """Whether B's gradient leaves `call` already summed over the replicas."""
        return self.gather_dtype is not None and replicas() > 1

    def penalty(self) -> tf.Tensor:
        """The per-example L2 penalty l2 · ‖B‖² (a scalar)."""
        return self.l2 * tf.reduce_sum(tf.square(self.matrix()))

    def get_config(self) -> dict[str, Any]:
        config = {**super().get_config(), "num_items": self.num_items, "l2": self.l2}
        config.pop("dtype", None)
        return config
