"""How replicas exchange gradients: fewer bytes than the optimizer's float32 all-reduce.

Why: two local workers spent most of each step all-reducing 52 MB of float32 gradients
(`benchmarks/bench_allreduce.py`, 3,000 items): 36 MB of it the item-item branch's
`[items, items]` gradient xᵀ·dy, which is a product of two thin `[batch, items]` factors.
Two changes, both used only when there is more than one replica:

- **The item-item gradient travels as its factors.** Each replica all-gathers every
  replica's x and dy (2 × global batch × items numbers) and forms the summed gradient
  Xᵀ·dY itself (`gathered_item_item`), instead of all-reducing items² numbers. It pays when
  2 × global batch < items (`gathers_item_item`); the product costs each replica the
  single-worker step's matmul.
- **The other gradients travel in bfloat16** (`train.gradient_dtype`): half the bytes,
  float32's exponent range (no loss scaling needed), 8 bits of mantissa. Adam divides each
  update by its running scale, so a sum rounded to 3 significant digits moves it by less
  than the batch-to-batch noise; the two-worker test checks the loss curve stays within 3%
  of one worker's.

The optimizer is then told not to aggregate again (`skip_gradients_aggregation`).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

GRADIENT_DTYPES = ("auto", "float32", "bfloat16")
ITEM_ITEM_GRADIENTS = ("auto", "dense", "gathered")


def replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def gathers_item_item(name: str, num_items: int, global_batch: int) -> bool:
    """`train.item_item_gradient`: `auto` gathers when x and dy (2 × global_batch × items
    numbers) are fewer than the items² of the matrix."""
    if name not in ITEM_ITEM_GRADIENTS:
        raise ValueError(f"train.item_item_gradient must be one of "
                         f"{list(ITEM_ITEM_GRADIENTS)}, got {name!r}")
    if name == "auto":
        return 2 * global_batch < num_items
    return name == "gathered"


def resolve_gradient_dtype(name: str, multi_worker: bool) -> tf.DType:
    """`train.gradient_dtype`: `auto` is bfloat16 between workers (bytes on a network),
    float32 between one machine's devices (NCCL or local copies: bytes are cheap there, and
    not every NCCL build reduces bfloat16)."""
    if name not in GRADIENT_DTYPES:
        raise ValueError(f"train.gradient_dtype must be one of {list(GRADIENT_DTYPES)}, "
                         f"got {name!r}")
    if name == "auto":
        return tf.bfloat16 if multi_worker else tf.float32
    return tf.as_dtype(name)


def gathered_item_item(x: tf.Tensor, matrix: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """x · B whose gradient for B is already the sum over replicas: Xᵀ·dY from every
    replica's x and dy, gathered in `dtype`.

    Call only in a replica context. x gets no gradient (it is the model's input); B's zero
    diagonal is the caller's (`ItemItemBranch.matrix`, whose own gradient keeps it zero).
    """

    @tf.custom_gradient
    def product(x: tf.Tensor, matrix: tf.Tensor):
        def gradient(dy: tf.Tensor):
            # x holds 0 and 1 / (1 − dropout): exact in bfloat16; dy is rounded like the
            # other gradients. The product is formed in float32.
            xs, dys = gather_rows([x, dy], dtype)
            return None, tf.matmul(xs, dys, transpose_a=True)

        return tf.matmul(x, matrix), gradient

    return product(x, matrix)


def gather_rows(tensors: Sequence[tf.Tensor], dtype: tf.DType) -> list[tf.Tensor]:
    """Every replica's `[rows, columns]` tensors concatenated along rows, sent in `dtype`
    and returned in their own dtype.

    The collective gather takes no bfloat16, so bfloat16 travels bit-cast as int32 (pairs of
    columns, padded to an even count): the same bytes, no rounding beyond the cast.
    """
    if dtype != tf.bfloat16:
        gathered = tf.distribute.get_replica_context().all_gather(
            [tf.cast(t, dtype) for t in tensors], axis=0)
        return [tf.cast(g, t.dtype) for g, t in zip(gathered, tensors)]
    packed = []
    for t in tensors:
        columns = tf.shape(t)[1]
        even = tf.pad(tf.cast(t, dtype), [[0, 0], [0, columns % 2]])
        packed.append(tf.bitcast(tf.reshape(even, [tf.shape(t)[0], -1, 2]), tf.int32))
    gathered = tf.distribute.get_replica_context().all_gather(packed, axis=0)
    return [
        tf.cast(tf.reshape(tf.bitcast(g, dtype), [tf.shape(g)[0], -1])[:, : tf.shape(t)[1]],
                t.dtype)
        for g, t in zip(gathered, tensors)
    ]


def sum_over_replicas(
    gradients: Sequence[tf.Tensor | tf.IndexedSlices | None],
    presummed: Sequence[bool],
    dtype: tf.DType,
) -> list[tf.Tensor | tf.IndexedSlices | None]:
    """Every gradient summed over the replicas, sent in `dtype` and returned in its own
    dtype; those flagged `presummed` (already the sum: `gathered_item_item`) are left alone.
    """
    summed = list(gradients)
    dense = [i for i, (g, done) in enumerate(zip(gradients, presummed))
             if g is not None and not done and not isinstance(g, tf.IndexedSlices)]
    if dense:
        reduced = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, [tf.cast(gradients[i], dtype) for i in dense])
        for i, r in zip(dense, reduced):
            summed[i] = tf.cast(r, gradients[i].dtype)
    for i, (g, done) in enumerate(zip(gradients, presummed)):
        if isinstance(g, tf.IndexedSlices) and not done:
            # Slices are summed by concatenating them: the optimizer adds duplicate rows.
            rows = tf.reshape(g.values, [tf.shape(g.values)[0], -1])
            (values,) = gather_rows([rows], dtype)
            values = tf.reshape(values, tf.concat([[-1], tf.shape(g.values)[1:]], 0))
            indices = tf.distribute.get_replica_context().all_gather(g.indices, axis=0)
            summed[i] = tf.IndexedSlices(values, indices, g.dense_shape)
    return summed
