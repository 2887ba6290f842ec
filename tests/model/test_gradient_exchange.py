"""Gradient exchange between replicas: the gathered item-item gradient is the all-reduced one,
bfloat16 sums are float32 sums rounded, slices survive, and the settings are checked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

from recsys_cvae.model.gradient_exchange import gathers_item_item, resolve_gradient_dtype
from tests.builders import REPO

# bfloat16 keeps 8 significant bits: a value and a sum of two are within 2^-8 of float32's.
BFLOAT16_RTOL = 2.0**-8

# Two logical CPUs must be configured before TensorFlow initialises: a fresh process. Each
# replica gets its own x and dy (replica id + 1 scales them), so a sum that forgot a replica,
# or counted one twice, differs from the float32 reference.
SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    import tensorflow as tf
    from recsys_cvae.model.gradient_exchange import gathered_item_item, sum_over_replicas
    from recsys_cvae.training.strategy import choose_strategy

    strategy = choose_strategy("mirrored", 2)
    rng = np.random.default_rng(0)
    items, batch = 7, 3
    x = tf.constant((rng.random((batch, items)) < 0.4).astype("float32") * 1.25)
    dy = tf.constant(rng.normal(size=(batch, items)).astype("float32") * 1e-3)
    w = tf.constant(rng.normal(size=(items, items)).astype("float32"))
    dense = tf.constant(rng.normal(size=(items, 5)).astype("float32"))
    values = tf.constant(rng.normal(size=(2, 5)).astype("float32"))

    def replica(dtype):
        scale = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group + 1,
                        tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(w)
            y = gathered_item_item(x * 1.0, tf.linalg.set_diag(w, tf.zeros([items])), dtype)
            target = tf.reduce_sum(y * dy * scale)
        gathered = tape.gradient(target, w)
        slices = tf.IndexedSlices(values * scale, tf.constant([1, 4], tf.int64),
                                  tf.constant([items, 5], tf.int64))
        summed = sum_over_replicas([dense * scale, slices, gathered], [False, False, True],
                                   dtype)
        return summed[0], tf.convert_to_tensor(summed[1]), summed[2], y

    out = {}
    for name in ("float32", "bfloat16"):
        results = strategy.run(tf.function(lambda: replica(tf.as_dtype(name))))
        out[name] = [strategy.experimental_local_results(r)[0].numpy().tolist()
                     for r in results]
    # What the dense all-reduce would give: xᵀ·dy summed over both replicas (scales 1, 2),
    # diagonal zero; and the forward pass is x·B with B's diagonal zero.
    item_item = (x.numpy().T @ dy.numpy()) * 3.0
    np.fill_diagonal(item_item, 0.0)
    b = w.numpy().copy()
    np.fill_diagonal(b, 0.0)
    slices = np.zeros((items, 5))
    slices[[1, 4]] = values.numpy() * 3.0
    out["expected"] = [(dense.numpy() * 3.0).tolist(), slices.tolist(), item_item.tolist(),
                       (x.numpy() @ b).tolist()]
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def exchanged():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_float32_exchange_equals_the_dense_all_reduce(exchanged):
    import numpy as np

    for got, expected in zip(exchanged["float32"], exchanged["expected"]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_bfloat16_exchange_is_the_float32_sum_rounded(exchanged):
    import numpy as np

    for got, expected in zip(exchanged["bfloat16"], exchanged["expected"]):
        expected = np.asarray(expected)
        np.testing.assert_allclose(got, expected, rtol=4 * BFLOAT16_RTOL,
                                   atol=4 * BFLOAT16_RTOL * np.abs(expected).max())
    # and it did round: bfloat16 is not float32 under another name
    assert exchanged["bfloat16"][0] != exchanged["float32"][0]


def test_auto_gathers_only_when_the_factors_are_smaller_than_the_matrix():
    assert gathers_item_item("auto", num_items=3000, global_batch=256)
    assert not gathers_item_item("auto", num_items=300, global_batch=256)
    assert gathers_item_item("gathered", 300, 256) and not gathers_item_item("dense", 3000, 1)


def test_auto_gradient_dtype_is_bfloat16_between_workers_only():
    assert resolve_gradient_dtype("auto", multi_worker=True) == tf.bfloat16
    assert resolve_gradient_dtype("auto", multi_worker=False) == tf.float32
    assert resolve_gradient_dtype("float32", multi_worker=True) == tf.float32


def test_unknown_settings_name_the_field():
    with pytest.raises(ValueError, match="train.gradient_dtype must be one of"):
        resolve_gradient_dtype("float8", multi_worker=True)
    with pytest.raises(ValueError, match="train.item_item_gradient must be one of"):
        gathers_item_item("sparse", 10, 1)
