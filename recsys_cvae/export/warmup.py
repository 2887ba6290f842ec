"""`assets.extra/tf_serving_warmup_requests`: one PredictRequest per signature.

Why: TF Serving (`--enable_model_warmup`) and this project's server replay the file at load
time, so the first real request does not pay for graph initialisation. Each request is one
user with nothing known, built from the signature's own input specs (`[batch]` string "",
`[batch]` float NaN, `[batch]` integer 1, `[batch, n]` string [[""]]), so a new signature is
warmed up without a change here. `model_spec.name` is left empty on purpose: TF Serving's
saved_model_warmup_util runs every record against the version being loaded, whatever name it
carries, so one export warms up under any --model_name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import tensorflow as tf

logger = logging.getLogger(__name__)


def unknown_value(spec: tf.TensorSpec) -> list:
    """One row of "nothing known" for an input of `spec` (a count or seed of 1 for an
    integer input: `sample`'s num_items and seed)."""
    value = "" if spec.dtype == tf.string else 1 if spec.dtype.is_integer else math.nan
    return [[value]] if spec.shape.rank == 2 else [value]


def write_warmup_requests(
    path: str, signature_inputs: Mapping[str, Mapping[str, tf.TensorSpec]]
) -> int:
    """Writes one PredictLog per signature (name -> its input specs); returns the count, 0
    when tensorflow-serving-api is not installed."""
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        logger.warning("tensorflow-serving-api is not installed; no warmup requests written")
        return 0
    with tf.io.TFRecordWriter(path) as writer:
        for signature, specs in signature_inputs.items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(signature_name=signature))
            for name, spec in specs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(unknown_value(spec),
                                                                   spec.dtype))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return len(signature_inputs)
