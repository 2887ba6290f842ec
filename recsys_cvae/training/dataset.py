"""tf.data input: one split's GZIP TFRecords → batches of raw, padded string features.

Why raw strings: the model owns every lookup and normalisation (layers built from the
feature spec), so the pipeline only parses and pads. The same dict of tensors is what the
serving signatures receive, which is what keeps training and serving from drifting apart.
No dense `[batch, num_items]` tensor is built here; the model scatters the multi-hot itself.

Each element is a dict:

    user_id             tf.string  [batch]
    history_item_ids    tf.string  [batch, n]   padded with ""
    target_item_ids     tf.string  [batch, m]   padded with ""
    <categorical attr>  tf.string  [batch]      "" = unknown
    <numeric attr>      tf.float32 [batch]      NaN = unknown
    history_weights     tf.float32 [batch, n]   only if the spec's examples carry them; 0 pad

Example:

    spec = FeatureSpec.load("W/features")
    for batch in make_dataset(spec, "validation", batch_size=256).take(1):
        batch["history_item_ids"].shape  # (256, longest history in the batch)
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from recsys_cvae.model.preprocessing import HISTORY_WEIGHTS
from recsys_cvae.spec import HISTORY, TARGETS, USER_ID, FeatureSpec, SpecError

SHUFFLE_BUFFER_USERS = 10_000
# `hold_out` draws each (user, item) from a fingerprint in [0, HOLD_OUT_BUCKETS).
HOLD_OUT_BUCKETS = 1 << 30


def split_files(spec: FeatureSpec, split: str) -> list[str]:
    """The split's TFRecord files in a stable order; raises if the glob matches nothing."""
    pattern = spec.split_pattern(split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise SpecError(
            f"{pattern}: no TFRecord files for split {split!r}; "
            "run `recsys-cvae features` for this workdir first"
        )
    return files


def make_dataset(
    spec: FeatureSpec,
    split: str | Sequence[str],
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    fold_targets: bool = False,
    hold_out: float = 0.0,
) -> tf.data.Dataset:
    """Batches of one split's users, as raw padded tensors (see the module docstring).

    Args:
      spec: the loaded feature spec (its directory resolves the split's files).
      split: `train`, `validation`, `test` or `cold`, or several splits read as one.
      batch_size: the GLOBAL batch size. With an `input_context` each pipeline yields
        per-replica batches of `input_context.get_per_replica_batch_size(batch_size)`.
      shuffle: shuffle files and users (reshuffled every epoch, reproducibly from `seed`).
      seed: shuffle seed.
      input_context: from `strategy.distribute_datasets_from_function`; shards the input
        across pipelines (by file when there are enough files, else by record).
      fold_targets: each user's held-out targets join their history (and targets are left
        empty): every interaction becomes input, for the serving refit on all the data
        (`training.refit`). History weights, when the spec has them, are 1 for the targets.
      hold_out: this share of each user's history becomes their targets instead (the old
        targets are dropped): the fold-in slice protocol models hold out of training to
        choose the linear term on (`training.linear_blend`). Drawn from a fingerprint of
        (user id, item id), so every pass, process and worker holds out the same items.

    Returns:
      A finite `tf.data.Dataset`; the last batch may be smaller.
    """
    splits = [split] if isinstance(split, str) else list(split)
    files = [path for name in splits for path in split_files(spec, name)]
    per_replica_batch = batch_size
    num_pipelines, pipeline_id = 1, 0
    if input_context is not None:
        per_replica_batch = input_context.get_per_replica_batch_size(batch_size)
        num_pipelines = input_context.num_input_pipelines
        pipeline_id = input_context.input_pipeline_id
    if per_replica_batch < 1:
        raise ValueError(f"batch_size must be at least 1 per replica, got {batch_size}")

    dataset = tf.data.Dataset.from_tensor_slices(files)
    shard_files = num_pipelines > 1 and len(files) >= num_pipelines
    if shard_files:
        dataset = dataset.shard(num_pipelines, pipeline_id)
    if shuffle:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
        cycle_length=min(len(files), 4),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if num_pipelines > 1 and not shard_files:
        dataset = dataset.shard(num_pipelines, pipeline_id)
    if shuffle:
        users = sum(spec.splits[name].users for name in splits) or SHUFFLE_BUFFER_USERS
        dataset = dataset.shuffle(
            min(users, SHUFFLE_BUFFER_USERS), seed=seed, reshuffle_each_iteration=True
        )
    parse_spec = spec.parse_spec()
    dataset = dataset.batch(per_replica_batch)
    dataset = dataset.map(
        lambda serialized: parse_batch(serialized, parse_spec, fold_targets, hold_out),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def parse_batch(
    serialized: tf.Tensor, parse_spec: dict, fold_targets: bool = False, hold_out: float = 0.0
) -> dict[str, tf.Tensor]:
    """Parses `[batch]` serialised examples; ragged id lists become `[batch, n]` padded with "".

    A batch whose users all have empty lists gets shape `[batch, 0]`; the model accepts it.
    With `fold_targets`, the targets are appended to the history; with `hold_out`, a share
    of the history becomes the targets (see `make_dataset`).
    """
    features = tf.io.parse_example(serialized, parse_spec)
    if hold_out > 0:
        _hold_out(features, hold_out)
    if fold_targets:
        targets = features[TARGETS]
        features[HISTORY] = tf.concat([features[HISTORY], targets], axis=1)
        if HISTORY_WEIGHTS in features:
            weights = features[HISTORY_WEIGHTS]  # ragged, as the history (spec.parse_spec)
            ones = targets.with_values(tf.ones_like(targets.values, dtype=tf.float32))
            features[HISTORY_WEIGHTS] = tf.concat([weights, ones], axis=1)
        features[TARGETS] = targets[:, :0]
    for name in (HISTORY, TARGETS):
        features[name] = features[name].to_tensor(default_value="")
    if HISTORY_WEIGHTS in features:
        weights = features[HISTORY_WEIGHTS]
        if isinstance(weights, tf.RaggedTensor):
            weights = weights.to_tensor(default_value=0.0, shape=tf.shape(features[HISTORY]))
        features[HISTORY_WEIGHTS] = weights
    return features


def _hold_out(features: dict[str, tf.Tensor], share: float) -> None:
    """Moves the history items whose (user, item) fingerprint falls below `share` of the
    buckets into the targets, in place (their weights are dropped with them)."""
    history = features[HISTORY]  # ragged [batch, None]
    users = tf.gather(features[USER_ID], history.value_rowids())
    keys = tf.strings.join([users, history.values], separator="\x1f")
    drawn = tf.strings.to_hash_bucket_fast(keys, HOLD_OUT_BUCKETS)
    held = history.with_values(drawn < int(share * HOLD_OUT_BUCKETS))
    features[TARGETS] = tf.ragged.boolean_mask(history, held)
    features[HISTORY] = tf.ragged.boolean_mask(history, tf.logical_not(held))
    if HISTORY_WEIGHTS in features:
        features[HISTORY_WEIGHTS] = tf.ragged.boolean_mask(features[HISTORY_WEIGHTS],
                                                           tf.logical_not(held))
