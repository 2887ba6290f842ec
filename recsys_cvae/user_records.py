"""One user record: the `tf.train.Example` the feature job writes and every reader parses.

Why apart from `spec.py`: the spec says what a record holds; this is how one is written
(`encode_user_example`, by the Beam job, protobuf only) and read back in Python
(`decode_user_example`, `read_user_records`: baselines, evaluation, export verification),
while tf.data parses the same bytes with `FeatureSpec.parse_spec`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from recsys_cvae import spec as S


def encode_user_example(
    spec_attributes: Iterable[S.AttributeSpec],
    user_id: str,
    history_item_ids: Iterable[str],
    target_item_ids: Iterable[str],
    attribute_values: Mapping[str, Any],
    history_weights: Iterable[float] | None = None,
) -> bytes:
    """Serialises one user as a `tf.train.Example` (see the module docstring).

    Missing attribute values become "" (categorical) or NaN (numeric): "unknown".
    Uses the protobuf classes directly, so Beam workers need no TensorFlow graph.
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    def bytes_feature(values: Iterable[str]) -> feature_pb2.Feature:
        return feature_pb2.Feature(
            bytes_list=feature_pb2.BytesList(value=[v.encode("utf-8") for v in values])
        )

    feature = {
        S.USER_ID: bytes_feature([user_id]),
        S.HISTORY: bytes_feature(history_item_ids),
        S.TARGETS: bytes_feature(target_item_ids),
    }
    if history_weights is not None:
        feature[S.HISTORY_WEIGHTS] = feature_pb2.Feature(
            float_list=feature_pb2.FloatList(value=list(history_weights))
        )
    for attribute in spec_attributes:
        value = attribute_values.get(attribute.name)
        if attribute.is_categorical:
            feature[attribute.name] = bytes_feature(["" if value is None else str(value)])
        else:
            number = math.nan if value is None or value == "" else float(value)
            feature[attribute.name] = feature_pb2.Feature(
                float_list=feature_pb2.FloatList(value=[number])
            )
    example = example_pb2.Example(features=feature_pb2.Features(feature=feature))
    return example.SerializeToString(deterministic=True)  # sorted map keys: same bytes every run


def decode_user_example(serialized: bytes, spec_attributes: Iterable[S.AttributeSpec]) -> dict:
    """The inverse of `encode_user_example`, in plain Python (for Beam and evaluation)."""
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example.FromString(serialized)
    feature = example.features.feature

    def strings(name: str) -> list[str]:
        return (
            [v.decode("utf-8") for v in feature[name].bytes_list.value] if name in feature else []
        )

    record: dict[str, Any] = {
        S.USER_ID: strings(S.USER_ID)[0],
        S.HISTORY: strings(S.HISTORY),
        S.TARGETS: strings(S.TARGETS),
    }
    if S.HISTORY_WEIGHTS in feature:
        record[S.HISTORY_WEIGHTS] = list(feature[S.HISTORY_WEIGHTS].float_list.value)
    for attribute in spec_attributes:
        if attribute.is_categorical:
            values = strings(attribute.name)
            record[attribute.name] = values[0] if values else ""
        else:
            values = (
                list(feature[attribute.name].float_list.value) if attribute.name in feature else []
            )
            record[attribute.name] = values[0] if values else math.nan
    return record


def read_user_records(spec: S.FeatureSpec, split: str) -> Iterator[dict]:
    """Decoded user records of one split (see `decode_user_example`), file by file.

    For in-process readers of small splits (evaluation, baselines, export checks); training
    reads through tf.data instead.
    """
    import tensorflow as tf

    pattern = spec.split_pattern(split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise S.SpecError(f"{pattern}: no TFRecord files for split {split!r}")
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    for serialized in dataset.as_numpy_iterator():
        yield decode_user_example(serialized, spec.attributes)
