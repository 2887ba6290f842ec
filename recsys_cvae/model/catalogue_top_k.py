"""Top-K over the catalogue, in one piece or chunk by chunk, with only core TensorFlow ops.

Why chunks: ranking the whole catalogue at once materialises the decoder's logits
`[batch, num_items]` float32 (and a masked copy): 1.2 GB per 1,000 users at 300k items.
Without the item-item branch the logits are h · Eᵀ + b with h `[batch, units]` the decoder's
last hidden layer and E `[num_items, units]` its item rows (`layers.ItemLogits`), so the
catalogue can be scored C items at a time — a block of E's rows — keeping a running top-K
and a running log-partition function:

    for each chunk [s, s + C):   l = h · E[s:s+C]ᵀ + b[s:s+C]            [batch, C]
        log Z  ← logaddexp(log Z, logsumexp(l))                          (every item)
        l      ← −∞ on the chunk's history items
        top    ← top_k(concat(top, l), K)                                [batch, K]
    scores = top − log Z                                                 (= log softmax)

A `tf.while_loop` with `parallel_iterations=1` runs the chunks one after another, so the
peak is a chunk's logits (batch × C) and rows of E (C × units, a copy), not batch ×
num_items. Ties go to the lower item index in both forms (`tf.math.top_k` keeps the lower
index first, and the running top holds earlier chunks), so the results are those of one
top-K over the whole catalogue.

With the attribute lift (`recsys_cvae.model.attribute_lift`) the logits gain s · Tᵀ, T
`[num_items, buckets]` item-major like E: `CVAE.output_factors` extends h and E by s and
T's columns, so the same chunks score both (one concatenated copy of E per call).

When: chunks need a model without the item-item branch (whose x · B needs the whole row;
it is only built for small catalogues) and a catalogue larger than `chunk_size`. Even then
a call whose logits are small — batch × num_items ≤ `one_piece_max_logits`, 16 MB of
float32 by default, e.g. one user — is ranked in one piece: chunks copy E's rows, which
costs more than it saves when the logits are a few megabytes. A `tf.cond` on the batch
size picks the form per call inside the exported graph. Both forms read E once with a
plain read (no `ResourceGather` on the variable: that would switch it to copy-on-read and
make every later read copy all of E).

The export's signatures and the training validation both call `catalogue_top_k`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import tensorflow as tf

from recsys_cvae.model.layers import ItemLogits
from recsys_cvae.spec import HISTORY

# A call with at most this many logits (batch × num_items) is ranked in one piece: 16 MB.
ONE_PIECE_MAX_LOGITS = 1 << 22


def uses_chunks(model: tf.keras.Model, chunk_size: int) -> bool:
    """Whether `catalogue_top_k` may rank `model`'s catalogue chunk by chunk."""
    return (
        chunk_size > 0
        and len(model.item_ids) > chunk_size
        and getattr(model, "item_item", None) is None
    )


def catalogue_top_k(
    model: tf.keras.Model,
    features: Mapping[str, tf.Tensor],
    k: int,
    chunk_size: int,
    from_history: bool = True,
    one_piece_max_logits: int = ONE_PIECE_MAX_LOGITS,
    excluded: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """The K best items for each user of `features`, history items (and `excluded`) left out.

    Args:
      model: a `recsys_cvae.model.CVAE`.
      features: the model's raw features (`history_item_ids` `[batch, n]` tf.string when
        `from_history`, plus the attributes).
      k: how many items (at most the catalogue's size).
      chunk_size: items ranked at a time when `uses_chunks(model, chunk_size)`.
      from_history: `recommend` (posterior mean, history excluded) or `generate` (prior
        mean from the attributes alone, nothing excluded).
      one_piece_max_logits: calls with at most this many logits rank in one piece anyway.
      excluded: `[batch, m]` int32 item indices also left out (−1: none): the export's
        policy and a request's exclusion list. Removed like history items; log Z still
        covers the whole catalogue.

    Returns: scores `[batch, k]` float32 (log softmax over the whole catalogue, −∞ where
    fewer than k items are left) and item indices `[batch, k]` int32, best first.
    """
    num_items = len(model.item_ids)
    if not uses_chunks(model, chunk_size):
        if from_history:
            logits = model.recommend_logits(features)
            exclude = model.history_mask(features[HISTORY])
        else:
            logits = model.generate_logits(features)
            exclude = tf.zeros_like(logits)
        if excluded is not None:
            exclude = tf.maximum(tf.cast(exclude, tf.float32),
                                 _history_mask(excluded, 0, num_items))
        return full_top_k(logits, exclude, k)
    hidden, kernel, bias = model.output_factors(features, from_history)  # logits = h·Eᵀ + b
    batch = tf.shape(hidden)[0]
    if from_history:
        history = model.history_indices(features[HISTORY])  # int32, like `excluded` below
    else:
        history = tf.fill([batch, 0], -1)
    if excluded is not None:
        history = tf.concat([history, tf.cast(excluded, tf.int32)], axis=1)

    def one_piece():
        logits = ItemLogits.rows(hidden, kernel, bias)
        return full_top_k(logits, _history_mask(history, 0, num_items), k)

    def chunks():
        return chunked_top_k(hidden, kernel, bias, history, k, chunk_size)

    small = tf.cast(batch, tf.int64) * num_items <= one_piece_max_logits
    return tf.cond(small, one_piece, chunks)


def full_top_k(logits: tf.Tensor, exclude: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Top-K of `logits` `[batch, num_items]` with `exclude` (same shape, 0/1) removed.

    Ranks by the logits and subtracts log Z after the top-K (the order is that of the log
    softmax, without a second `[batch, num_items]` tensor). Returns scores `[batch, k]`
    float32 and indices `[batch, k]` int32.
    """
    logits = tf.cast(logits, tf.float32)
    masked = tf.where(exclude > 0, tf.constant(-math.inf), logits)
    top = tf.math.top_k(masked, k=k, sorted=True)
    return top.values - tf.reduce_logsumexp(logits, axis=-1, keepdims=True), top.indices


def chunked_top_k(
    hidden: tf.Tensor,
    kernel: tf.Tensor,
    bias: tf.Tensor,
    history: tf.Tensor,
    k: int,
    chunk_size: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """`full_top_k` of the logits h · Eᵀ + b, `chunk_size` items at a time (module docstring).

    Args:
      hidden: `[batch, units]` h, the decoder's last hidden layer.
      kernel: `[num_items, units]` E, one row per item (`layers.ItemLogits.kernel`).
      bias: `[num_items]` b.
      history: `[batch, n]` int32 item indices to exclude, −1 for padding and unknown ids.
      k: how many items, at most num_items.
      chunk_size: items per chunk (the last one may be smaller).

    Returns: scores `[batch, k]` float32 and indices `[batch, k]` int32, best first.
    """
    num_items = int(kernel.shape[0])
    if not 0 < k <= num_items:
        raise ValueError(f"k must be in 1..{num_items} (the catalogue's size), got {k}")
    if chunk_size < 1:
        raise ValueError(f"export.top_k_chunk_size must be positive here, got {chunk_size}")
    num_chunks = -(-num_items // chunk_size)
    batch = tf.shape(hidden)[0]

    def body(chunk, values, indices, log_z):
        start = chunk * chunk_size
        items = tf.range(start, tf.minimum(start + chunk_size, num_items))  # [size]
        size = tf.size(items)
        logits = ItemLogits.rows(hidden, tf.gather(kernel, items), tf.gather(bias, items))
        log_z = tf.reduce_logsumexp(
            tf.stack([log_z, tf.reduce_logsumexp(logits, axis=-1)], axis=-1), axis=-1
        )
        logits = tf.where(_history_mask(history, start, size) > 0, -math.inf, logits)
        top = tf.math.top_k(tf.concat([values, logits], axis=1), k=k, sorted=True)
        ids = tf.concat([indices, tf.broadcast_to(items, [batch, size])], axis=1)
        return chunk + 1, top.values, tf.gather(ids, top.indices, batch_dims=1), log_z

    initial = (
        tf.constant(0),
        tf.fill([batch, k], tf.constant(-math.inf)),
        tf.zeros([batch, k], tf.int32),
        tf.fill([batch], tf.constant(-math.inf)),
    )
    _, values, indices, log_z = tf.while_loop(
        lambda chunk, *_: chunk < num_chunks, body, initial, parallel_iterations=1
    )
    return values - log_z[:, None], indices


def _history_mask(history: tf.Tensor, start: tf.Tensor | int, size: tf.Tensor | int) -> tf.Tensor:
    """`[batch, size]` float 1 where items start .. start + size − 1 are in `history`
    (`[batch, n]` item indices, −1 = none): a scatter of batch × n, no one-hot."""
    history = tf.cast(history, tf.int32)
    rows = tf.broadcast_to(tf.range(tf.shape(history)[0])[:, None], tf.shape(history))
    local = history - start
    inside = (history >= 0) & (local >= 0) & (local < size)
    pairs = tf.stack([tf.boolean_mask(rows, inside), tf.boolean_mask(local, inside)], axis=-1)
    return tf.scatter_nd(pairs, tf.ones(tf.shape(pairs)[:1]), [tf.shape(history)[0], size])
