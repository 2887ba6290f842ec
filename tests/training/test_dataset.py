"""tf.data input: parsing, padding, shuffling and sharding of one split's TFRecords."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from recsys_cvae import spec as S
from recsys_cvae.training.dataset import make_dataset
from tests.builders import write_tiny_features


def as_strings(tensor: tf.Tensor) -> list:
    return [[v.decode() for v in row] for row in tensor.numpy()]


def test_batches_are_raw_padded_tensors(tmp_path):
    spec = write_tiny_features(str(tmp_path))
    batch = next(iter(make_dataset(spec, S.TRAIN, batch_size=3)))

    assert sorted(batch) == ["age", "history_item_ids", "region", "target_item_ids", "user_id"]
    assert [u.decode() for u in batch["user_id"].numpy()] == ["u1", "u2", "u3"]
    # The longest history has 2 items, the longest target list 2: shorter rows pad with "".
    assert as_strings(batch["history_item_ids"]) == [["a", "b"], ["c", ""], ["", ""]]
    assert as_strings(batch["target_item_ids"]) == [["", ""], ["a", ""], ["b", "c"]]
    # Unknown attributes stay raw: "" for a categorical, NaN for a numeric.
    assert [r.decode() for r in batch["region"].numpy()] == ["north", "south", ""]
    age = batch["age"].numpy()
    assert batch["age"].dtype == tf.float32
    assert age[0] == 30.0 and math.isnan(age[1]) and age[2] == 50.0


def test_last_batch_is_smaller_and_every_user_appears_once(tmp_path):
    spec = write_tiny_features(str(tmp_path))
    sizes = [int(b["user_id"].shape[0]) for b in make_dataset(spec, S.TRAIN, batch_size=2)]
    assert sizes == [2, 1]


def test_shuffle_is_reproducible_from_the_seed(tmp_path):
    users = [(f"u{i}", ["a"], [], "north", 20.0) for i in range(20)]
    spec = write_tiny_features(str(tmp_path), users=users, files=2)

    def order(seed):
        dataset = make_dataset(spec, S.TRAIN, batch_size=20, shuffle=True, seed=seed)
        return [u.decode() for u in next(iter(dataset))["user_id"].numpy()]

    assert order(7) == order(7)
    assert sorted(order(7)) == sorted(u[0] for u in users)
    assert order(7) != order(8)


@pytest.mark.parametrize("files", [1, 2])
def test_input_context_shards_users_and_splits_the_global_batch(tmp_path, files):
    users = [(f"u{i}", ["a"], [], "north", 20.0) for i in range(6)]
    spec = write_tiny_features(str(tmp_path), users=users, files=files)
    seen, sizes = [], []
    for pipeline in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2
        )
        for batch in make_dataset(spec, S.TRAIN, batch_size=4, input_context=context):
            seen.extend(u.decode() for u in batch["user_id"].numpy())
            sizes.append(int(batch["user_id"].shape[0]))
    # Global batch 4 over 2 replicas → 2 per replica; the 2 pipelines see disjoint halves.
    assert max(sizes) == 2
    assert sorted(seen) == sorted(u[0] for u in users)


def test_all_empty_histories_give_a_zero_width_batch(tmp_path):
    spec = write_tiny_features(str(tmp_path), users=[("u1", [], ["a"], "north", 1.0)])
    batch = next(iter(make_dataset(spec, S.TRAIN, batch_size=4)))
    assert batch["history_item_ids"].shape == (1, 0)


def test_a_split_without_files_names_the_pattern(tmp_path):
    spec = write_tiny_features(str(tmp_path))
    missing = S.FeatureSpec(
        attributes=spec.attributes,
        item_vocabulary_file=spec.item_vocabulary_file,
        num_items=spec.num_items,
        splits={S.VALIDATION: S.SplitSpec("validation/part-*.tfrecord.gz", 0)},
        directory=spec.directory,
    )
    with pytest.raises(S.SpecError, match=r"validation/part-\*\.tfrecord\.gz: no TFRecord"):
        make_dataset(missing, S.VALIDATION, batch_size=2)


def test_the_fixture_split_round_trips_every_user(features_dir):
    spec = S.FeatureSpec.load(features_dir)
    users = np.concatenate(
        [b["user_id"].numpy() for b in make_dataset(spec, S.VALIDATION, batch_size=8)]
    )
    assert len(users) == spec.splits[S.VALIDATION].users == len(set(users))
