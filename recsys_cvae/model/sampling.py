"""Synthetic users' items from the CVAE: z ~ p(z|c), then items without replacement from the
decoder's softmax, deterministic per seed, in core TensorFlow ops only.

Why Gumbel-top-k: adding independent Gumbel noise to the logits and keeping the k largest
draws k items without replacement with exactly the probabilities of sequential sampling
from softmax(logits) (Kool et al., 2019), in one `top_k` — no loop over draws, no
renormalisation, so TF Serving runs it as any other signature.

Why per-row stateless seeds: a synthetic user must come out the same for the same seed
whatever batch it is in and on whichever worker (a Beam job over millions of users, a
replay), so every row's noise comes from its own seed (`stateless_*` ops, streams 0 and 1
for z and the Gumbel keys), never from a global generator.
"""

from __future__ import annotations

import tensorflow as tf

Z_STREAM, GUMBEL_STREAM = 0, 1


def row_noise(seeds: tf.Tensor, width: int | tf.Tensor, stream: int, normal: bool) -> tf.Tensor:
    """`[batch, width]` float32 noise, row r from seed (seeds[r], stream): standard normal,
    or uniform in (0, 1)."""
    def one(seed: tf.Tensor) -> tf.Tensor:
        pair = tf.stack([tf.cast(seed, tf.int64), tf.constant(stream, tf.int64)])
        if normal:
            return tf.random.stateless_normal([width], seed=pair)
        return tf.random.stateless_uniform([width], seed=pair, minval=1e-12, maxval=1.0)

    return tf.map_fn(one, tf.cast(seeds, tf.int64), fn_output_signature=tf.float32)


def gumbel_top_k(logits: tf.Tensor, seeds: tf.Tensor, counts: tf.Tensor,
                 max_items: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Item indices `[batch, width]` drawn without replacement from softmax(logits) and
    whether each slot is used (`slot < counts[row]`); width = the largest count in the batch,
    capped at `max_items` (and at the catalogue)."""
    num_items = tf.shape(logits)[1]
    counts = tf.clip_by_value(tf.cast(counts, tf.int32), 0, tf.minimum(max_items, num_items))
    width = tf.reduce_max(tf.concat([counts, [0]], axis=0))
    uniform = row_noise(seeds, num_items, GUMBEL_STREAM, normal=False)
    keys = tf.cast(logits, tf.float32) - tf.math.log(-tf.math.log(uniform))
    indices = tf.math.top_k(keys, k=width, sorted=True).indices
    used = tf.range(width)[None, :] < counts[:, None]
    return indices, used
