"""One loaded SavedModel version, and requests checked against its SignatureDefs.

Why it is separate from the server: this is the part that must behave exactly like TF Serving's
`predict_util` (which request is refused, with which gRPC code and message), independent of how
versions are found or how RPCs arrive. The gRPC server and the warmup replay both call
`run_signature`.

A signature is checked from its SignatureDef (`MetaGraphDef.signature_def` of the `serve`
graph), the same proto TF Serving validates against and returns from GetModelMetadata:
- the request's input keys equal the signature's (else "input size does not match signature");
- each tensor has the signature's dtype and rank, matching every fixed dimension;
- all inputs share dimension 0 (the batch), at most `max_batch_size`;
- a tensor may not claim more than `max_elements` values (checked before decoding, so a small
  message cannot expand into gigabytes).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from serving.flags import MIB

DEFAULT_SIGNATURE = "serving_default"
# A decoded request tensor may take at most this many times the message size cap in memory
# (bytes per element: the dtype's size; a string is a pointer plus a bytes object).
DECODED_SIZE_FACTOR = 4
STRING_DECODED_BYTES = 48  # an 8-byte pointer + a ~40-byte bytes object for a short id


class RpcError(Exception):
    """A request the server refuses, with the gRPC code TF Serving uses for the same case."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Servable:
    """One loaded version: the callable signatures and their SignatureDefs (for validation).

    Attributes:
      version: the integer folder name.
      path: the version folder.
      functions: signature key -> concrete function taking the signature's inputs as keywords.
      signature_defs: MetaGraphDef.signature_def of the `serve` graph, as TF Serving reports it.
      loaded: the object tf.saved_model.load returned; kept so its variables stay alive.
    """

    version: int
    path: str
    functions: dict
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]
    loaded: object


def load_servable(path: str, version: int) -> Servable:
    """Loads the SavedModel in `path` and the SignatureDefs of its `serve` MetaGraph."""
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved_model.ParseFromString(f.read())
    graphs = [g for g in saved_model.meta_graphs if "serve" in g.meta_info_def.tags]
    if not graphs:
        raise ValueError(f"{path}: the SavedModel has no MetaGraph tagged 'serve'")
    loaded = tf.saved_model.load(path, tags=["serve"])
    return Servable(
        version=version,
        path=path,
        functions=dict(loaded.signatures),
        signature_defs=dict(graphs[0].signature_def),
        loaded=loaded,
    )


# assets.extra/provenance.json, written by recsys-cvae's export; read only to log a line, and
# only up to this size (an export is trusted less than the code reading it)
_PROVENANCE_MAX_BYTES = 1 << 20


def provenance_summary(path: str) -> str:
    """One line of the version's `assets.extra/provenance.json` for the load log (created,
    code commit, users trained on, the feature spec's hash); "" when it has none."""
    file = os.path.join(path, "assets.extra", "provenance.json")
    try:
        if tf.io.gfile.stat(file).length > _PROVENANCE_MAX_BYTES:
            return "provenance.json too large to read"
        with tf.io.gfile.GFile(file) as f:
            facts = json.load(f)
        code, trained = facts.get("code") or {}, facts.get("trained_on") or {}
        commit = code.get("git_commit")
        parts = [f"created {facts.get('created')}",
                 f"recsys-cvae {code.get('version')}"
                 + (f" @ {commit[:12]}{'+changes' if code.get('git_dirty') else ''}"
                    if commit else ""),
                 f"trained on {trained.get('users')} users",
                 f"feature spec sha256 {(facts.get('features') or {}).get('feature_spec_sha256')}"]
        return "; ".join(parts)
    except (tf.errors.NotFoundError, OSError, ValueError, AttributeError, TypeError):
        return ""


def _checked_array(
    name: str, proto: tensor_pb2.TensorProto | np.ndarray, info: meta_graph_pb2.TensorInfo,
    max_elements: int,
) -> np.ndarray:
    """Checks one request tensor (a TensorProto, or a numpy array REST decoded from JSON)
    against the signature's TensorInfo, then decodes it.

    Shape and size are checked on the proto before decoding, so a small message that claims a
    huge shape is refused instead of being expanded in memory.
    """
    if isinstance(proto, np.ndarray):  # decoded already (REST): built with the input's dtype
        # (no decoded-size cap: every JSON value is in the body, which the body cap bounds)
        _check_shape(name, list(proto.shape), info, max_elements)
        return proto
    if proto.dtype != info.dtype:
        expected, sent = _dtype_name(info.dtype), _dtype_name(proto.dtype)
        raise invalid(f'input "{name}": expects {expected} but {sent} was sent')
    dims = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
        raise invalid(f'input "{name}": the tensor shape must be fully defined, got {dims}')
    _check_shape(name, dims, info, max_elements)
    item_bytes = (STRING_DECODED_BYTES if proto.dtype == types_pb2.DT_STRING
                  else tf.dtypes.as_dtype(proto.dtype).size)
    decoded = math.prod(dims) * item_bytes
    if decoded > DECODED_SIZE_FACTOR * max_elements:
        # A TensorProto may hold one value for a whole shape (it is repeated), so its bytes
        # say nothing about the memory it decodes into: [1024, 16384] strings from one
        # 158-byte request would take ~1.2 GB. The decoded size is capped instead.
        raise RpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f'input "{name}": shape {dims} decodes to ~{decoded // MIB} MiB, over the cap '
            f"of {DECODED_SIZE_FACTOR} x the message size limit "
            f"({DECODED_SIZE_FACTOR * max_elements // MIB} MiB)",
        )
    try:
        return tf.make_ndarray(proto)
    except Exception as error:  # noqa: BLE001  (any decoding failure is the sender's)
        raise invalid(f"tensor parsing error: {name} ({error})") from None


def _check_shape(name: str, dims: list[int], info: meta_graph_pb2.TensorInfo,
                 max_elements: int) -> None:
    if not info.tensor_shape.unknown_rank:
        expected = [d.size for d in info.tensor_shape.dim]
        if len(dims) != len(expected) or any(e >= 0 and d != e for d, e in zip(dims, expected)):
            raise invalid(
                f'input "{name}": expects shape {expected} (-1 = any size) but {dims} was sent'
            )
    if math.prod(dims) > max_elements:
        raise invalid(f'input "{name}": {math.prod(dims)} elements, over the cap of {max_elements}')


def _dtype_name(enum: int) -> str:
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"unknown dtype {enum}"


def parse_inputs(
    signature: meta_graph_pb2.SignatureDef, inputs, max_batch_size: int, max_elements: int
) -> dict[str, np.ndarray]:
    """Validates a request's `inputs` map against a SignatureDef, as TF Serving does.

    Returns:
      input key -> numpy array, ready to pass to the signature function as keywords.
    """
    sent, expected = set(inputs.keys()), set(signature.inputs.keys())
    if sent != expected:
        raise invalid(
            f"input size does not match signature: {len(sent)}!={len(expected)} "
            f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
            f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
            f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
        )
    arrays = {
        key: _checked_array(key, inputs[key], signature.inputs[key], max_elements)
        for key in sorted(expected)
    }
    batch_sizes = {key: a.shape[0] for key, a in arrays.items() if a.ndim > 0}
    if len(set(batch_sizes.values())) > 1:
        raise invalid(
            f"Batching Run() input tensors must have equal 0th-dimension size, got {batch_sizes}"
        )
    batch = max(batch_sizes.values(), default=0)
    if batch > max_batch_size:
        raise invalid(f"Task size {batch} is larger than maximum input batch size {max_batch_size}")
    return arrays


def output_keys(signature: meta_graph_pb2.SignatureDef, output_filter) -> list[str]:
    """The output aliases to return: `output_filter` if given (checked), else all of them."""
    seen: list[str] = []
    for alias in output_filter:
        if alias not in signature.outputs:
            raise invalid(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                f"the set {{{','.join(sorted(signature.outputs))}}}."
            )
        if alias in seen:
            raise invalid(f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return seen or sorted(signature.outputs)


def run_signature(
    servable: Servable, signature_name: str, inputs, output_filter, max_batch_size: int,
    max_elements: int, batcher=None,
) -> dict[str, np.ndarray]:
    """Validates and runs one signature of one servable: the core of Predict and of warmup.

    With a `serving.batching.Batcher`, the call may be merged with concurrent requests for
    the same signature whose inputs have the same dtypes and non-batch dimensions.
    """
    if signature_name not in servable.functions or signature_name not in servable.signature_defs:
        raise RpcError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f'Serving signature key "{signature_name}" not found.',
        )
    signature = servable.signature_defs[signature_name]
    arrays = parse_inputs(signature, inputs, max_batch_size, max_elements)
    keys = output_keys(signature, output_filter)
    function = servable.functions[signature_name]
    dtypes = {key: tf.dtypes.as_dtype(info.dtype) for key, info in signature.inputs.items()}

    def call(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            # EagerTensors of the signature's dtypes, made here: given numpy arrays, the
            # function's own argument binding casts each through its TensorSpec, which costs
            # ~0.3 ms a call with the interpreter lock held (a fifth of a REST request's).
            outputs = function(**{key: tf.constant(value, dtypes[key])
                                  for key, value in batch.items()})
        except (TypeError, ValueError) as error:
            raise invalid(
                f"the inputs do not fit the signature {signature_name}: {error}") from None
        except tf.errors.OpError as error:
            code = grpc.StatusCode(_GRPC_CODES[error.error_code])
            raise RpcError(code, first_line(error.message)) from None
        return {key: value.numpy() for key, value in outputs.items()}

    if batcher is None or any(a.ndim == 0 for a in arrays.values()):
        outputs = call(arrays)
    else:
        key = (id(servable), signature_name,
               tuple((k, a.dtype.str, a.shape[1:]) for k, a in sorted(arrays.items())))
        outputs = batcher.run(key, call, arrays)
    return {key: outputs[key] for key in keys}


_GRPC_CODES = {code.value[0]: code.value for code in grpc.StatusCode}


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "error"


def warm_up(servable: Servable, max_batch_size: int, max_elements: int) -> int:
    """Replays assets.extra/tf_serving_warmup_requests (PredictLog records); returns the count."""
    path = os.path.join(servable.path, "assets.extra", "tf_serving_warmup_requests")
    if not tf.io.gfile.exists(path):
        return 0
    count = 0
    for record in tf.data.TFRecordDataset(path):
        entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if entry.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"{path}: record {count}: only predict_log warmup records are served")
        request = entry.predict_log.request
        run_signature(
            servable, request.model_spec.signature_name or DEFAULT_SIGNATURE, request.inputs,
            request.output_filter, max_batch_size, max_elements,
        )
        count += 1
    return count


_PROTO_FIELDS = {
    tf.float32: "float_val", tf.float64: "double_val", tf.int32: "int_val",
    tf.int64: "int64_val", tf.bool: "bool_val", tf.string: "string_val",
}


def output_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """An output as TF Serving writes it (Tensor::AsProtoField): typed repeated fields.

    Clients that read `outputs["scores"].float_val` directly, not only `tf.make_ndarray`, get
    what they expect; dtypes without a typed field fall back to `tensor_content`.
    """
    dtype = tf.dtypes.as_dtype(array.dtype)
    field = _PROTO_FIELDS.get(dtype)
    if field is None:
        return tf.make_tensor_proto(array)
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    getattr(proto, field).extend(array.ravel().tolist())
    return proto
