"""The client's TensorFlow-free tensor conversion agrees with TensorFlow's own
(`tf.make_tensor_proto` / `tf.make_ndarray`, tensorflow/python/framework/tensor_util.py), the
reference any TF Serving client is written against."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.tensor_protos import dtype_name, to_ndarray, to_tensor_proto

ARRAYS = {
    "float32": np.array([[0.5, -1.0], [3.25, np.inf]], np.float32),
    "float64": np.array([1e-300, 2.0]),
    "int32": np.array([[1, -2, 3]], np.int32),
    "int64": np.array([2**40, -1], np.int64),
    "bool": np.array([True, False]),
    "strings": np.array([[b"i1", b""], ["é".encode(), b"i7"]], dtype=object),
    "empty": np.zeros((2, 0), np.float32),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_round_trips_agree_with_tensorflow(name):
    array = ARRAYS[name]
    ours = to_tensor_proto(array)
    theirs = tf.make_tensor_proto(array)
    assert ours.dtype == theirs.dtype
    assert ours.tensor_shape == theirs.tensor_shape
    np.testing.assert_array_equal(tf.make_ndarray(ours), array)  # TF reads what we write
    np.testing.assert_array_equal(to_ndarray(theirs), tf.make_ndarray(theirs))  # we read TF's


def test_repeated_value_fields_are_read_as_tensorflow_reads_them():
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2),
             tensor_shape_pb2.TensorShapeProto.Dim(size=3)])
    protos = [
        tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape,
                               float_val=[1, 2, 3, 4, 5, 6]),
        tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, float_val=[7]),
        tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, tensor_shape=shape, int64_val=[1, 2]),
        tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=[b"a"]),
        tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32, tensor_shape=shape),
    ]
    for proto in protos:
        np.testing.assert_array_equal(to_ndarray(proto), tf.make_ndarray(proto))


def test_dtype_names_are_tensorflows():
    for enum in (types_pb2.DT_FLOAT, types_pb2.DT_STRING, types_pb2.DT_INT64, types_pb2.DT_BOOL,
                 types_pb2.DT_DOUBLE, types_pb2.DT_INT32):
        assert dtype_name(enum) == tf.dtypes.as_dtype(enum).name
