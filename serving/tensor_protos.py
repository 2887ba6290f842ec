"""numpy arrays <-> TensorProto without TensorFlow's runtime, for clients.

Why: `tf.make_tensor_proto` / `tf.make_ndarray` need `import tensorflow` (seconds and a GB of
address space) in a process that only sends a request: `recsys-cvae query` and a user's thin
client. The wire format is small: a dtype enum, a shape, and the values either packed
little-endian in `tensor_content` or repeated in the `<type>_val` field; a single `_val`
value stands for every element (tensor.proto: "If there is a single element, it is
broadcast"; `tf.make_ndarray` repeats the last of fewer values). This module reads both forms
as `tf.make_ndarray` does and writes the form
TensorFlow writes (`tensor_content` for numbers, `string_val` for strings).

The protos are TensorFlow's generated `tensor_pb2` / `types_pb2` modules, which
`tensorflow-serving-api` imports too.
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

# dtype enum -> (name as tf.dtypes names it, numpy dtype, repeated field of TensorProto).
_DTYPES = {
    types_pb2.DT_FLOAT: ("float32", np.float32, "float_val"),
    types_pb2.DT_DOUBLE: ("float64", np.float64, "double_val"),
    types_pb2.DT_HALF: ("float16", np.float16, "half_val"),
    types_pb2.DT_INT32: ("int32", np.int32, "int_val"),
    types_pb2.DT_INT16: ("int16", np.int16, "int_val"),
    types_pb2.DT_INT8: ("int8", np.int8, "int_val"),
    types_pb2.DT_UINT8: ("uint8", np.uint8, "int_val"),
    types_pb2.DT_INT64: ("int64", np.int64, "int64_val"),
    types_pb2.DT_BOOL: ("bool", np.bool_, "bool_val"),
    types_pb2.DT_STRING: ("string", object, "string_val"),
}
_BY_NUMPY = {
    np.dtype(numpy): enum for enum, (_, numpy, _) in _DTYPES.items() if numpy is not object
}


def dtype_name(enum: int) -> str:
    """`types_pb2` enum -> the name `tf.dtypes.as_dtype(enum).name` gives ("float32")."""
    if enum not in _DTYPES:
        return types_pb2.DataType.Name(enum).removeprefix("DT_").lower()
    return _DTYPES[enum][0]


def numpy_dtype(name: str) -> type:
    """"float32" -> np.float32, "string" -> object."""
    for dtype_name_, numpy, _ in _DTYPES.values():
        if dtype_name_ == name:
            return numpy
    raise ValueError(f"unsupported tensor dtype {name}")


def to_tensor_proto(array: np.ndarray) -> tensor_pb2.TensorProto:
    """A numpy array (numbers, bools, or bytes/str objects) -> TensorProto."""
    array = np.asarray(array)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape]
    )
    if array.dtype == object or array.dtype.kind in "SU":
        values = [v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()]
        return tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=values
        )
    if array.dtype not in _BY_NUMPY:
        raise ValueError(f"unsupported array dtype {array.dtype}")
    return tensor_pb2.TensorProto(
        dtype=_BY_NUMPY[array.dtype], tensor_shape=shape,
        tensor_content=np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes(),
    )


def to_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """TensorProto -> numpy array, as `tf.make_ndarray` reads it (strings as bytes objects)."""
    if proto.dtype not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {types_pb2.DataType.Name(proto.dtype)}")
    _, numpy, field = _DTYPES[proto.dtype]
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    size = int(np.prod(shape, dtype=np.int64))
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, np.dtype(numpy).newbyteorder("<"))
        return flat.astype(numpy).reshape(shape)
    if proto.dtype == types_pb2.DT_HALF:  # half_val holds the float16 bit patterns
        values = np.array(proto.half_val, np.uint16).view(np.float16)
    elif numpy is object:
        values = np.array(list(proto.string_val), dtype=object)
    else:
        values = np.array(getattr(proto, field), dtype=numpy)
    if values.size == 0:
        return np.zeros(shape, dtype=numpy) if numpy is not object else np.full(shape, b"", object)
    if values.size < size:  # as tf.make_ndarray: the last value repeats (one is broadcast)
        values = np.concatenate([values, np.repeat(values[-1:], size - values.size)])
    return values[:size].reshape(shape)
