"""TF Serving's REST JSON <-> tensors, to the letter of `tensorflow_serving/util/json_tensor.cc`.

Why a port and not `np.array(json)`: TF Serving is strict, and a client written against it
relies on that. A float input takes JSON numbers only (`null` or `true` is a 400, not NaN or
1.0: `AddValueToTensor`); every instance names every input (`FillTensorMapFromInstancesList`:
"keys must be equal to"); `"instances": []` is refused ("No values in 'instances' array");
lists must be dense at one rank (`FillTensorProto`); strings are JSON strings or
`{"b64": ...}`. Each function below cites the C++ function it follows. Numbers outside
float32's range are refused too (rapidjson's GetFloat would turn 1e39 into inf).

The answers are written as `MakeRowFormatJsonFromTensors` / `MakeColumnarFormatJsonFromTensors`
write them: `{"predictions": [...]}` for row requests, `{"outputs": ...}` for columnar ones,
one object per row (or the bare value) depending on how many outputs there are.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorflow.core.framework import types_pb2

from serving.tensor_protos import dtype_name, numpy_dtype, to_ndarray

ROW, COLUMNAR = "row", "columnar"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# what JSON writes escaped (json.dumps with ensure_ascii=False): quote, backslash, controls
_ESCAPED = re.compile(rb'[\x00-\x1f"\\]')
# the leaf types `_plain_leaves` lets through without a check per value
_PLAIN_TYPES = {types_pb2.DT_STRING: {str}, types_pb2.DT_FLOAT: {float, int},
                types_pb2.DT_DOUBLE: {float, int}}
_INT32 = (types_pb2.DT_INT32, types_pb2.DT_INT16, types_pb2.DT_INT8, types_pb2.DT_UINT8)


class JsonTensorError(ValueError):
    """A request TF Serving answers with INVALID_ARGUMENT (HTTP 400), with its message."""


def _debug(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=True)[:200]


def _type_name(value: Any) -> str:
    """rapidjson's type names (`JsonTypeString`)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        return "NUMBER"
    if isinstance(value, str):
        return "STRING"
    return "OBJECT" if isinstance(value, dict) else "ARRAY"


def _type_error(value: Any, dtype: int) -> JsonTensorError:
    """`TypeError` in json_tensor.cc."""
    expected = types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()  # DataTypeString
    return JsonTensorError(f"JSON Value: {_debug(value)} Type: {_type_name(value)} is not of "
                           f"expected type: {expected}")


def _is_b64(value: Any) -> bool:
    """`IsValBase64Object`: an object with exactly one key, "b64", holding a string."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _scalar(value: Any, dtype: int) -> Any:
    """One JSON leaf as a value of `dtype` (`AddValueToTensor`), or JsonTensorError."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if dtype in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE):
        if not number:
            raise _type_error(value, dtype)
        if dtype == types_pb2.DT_FLOAT and math.isfinite(value) and abs(value) > _FLOAT32_MAX:
            raise JsonTensorError(f"JSON Value: {_debug(value)} is out of range for float32")
        return float(value)
    if dtype in _INT32 or dtype == types_pb2.DT_INT64:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _type_error(value, dtype)
        info = np.iinfo(numpy_dtype(dtype_name(dtype)))
        if not info.min <= value <= info.max:
            raise _type_error(value, dtype)
        return value
    if dtype == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise _type_error(value, dtype)
        return value
    if dtype == types_pb2.DT_STRING:
        if isinstance(value, dict):
            if not _is_b64(value):
                raise JsonTensorError(
                    f"JSON Value: {_debug(value)} not formatted correctly for base64 data")
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise JsonTensorError("Unable to base64 decode") from None
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return value.encode()
    raise JsonTensorError(f"Conversion of JSON Value: {_debug(value)} to type: "
                          f"{types_pb2.DataType.Name(dtype)} is not supported")


def _shape(value: Any) -> list[int]:
    """`GetDenseTensorShape`: the sizes along the first element of each level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


def _fill(value: Any, shape: list[int], dtype: int, out: list, level: int = 0) -> None:
    """`FillTensorProto`: leaves at the rank's level only, every list of its level's size.
    Iterative over levels of one list at a time (Python's recursion stops at ~1000 levels,
    and `_shape` bounds the depth by the first element's)."""
    stack = [(value, level)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, list):
            if depth != len(shape):
                raise JsonTensorError(
                    f"JSON Value: {_debug(item)} found at incorrect level: {depth + 1} in the "
                    f"JSON DOM. Expected at level: {len(shape)}")
            out.append(_scalar(item, dtype))
            continue
        if depth >= len(shape):
            raise JsonTensorError(
                f"Encountered list at unexpected level: {depth} expected < {len(shape)}")
        if len(item) != shape[depth]:
            raise JsonTensorError(
                f"Encountered list at unexpected size: {len(item)} at level: {depth} expected "
                f"size: {shape[depth]}")
        if depth == len(shape) - 1 and _plain_leaves(item, dtype):
            out.extend(_leaves(item, dtype))  # the common case, without a call per value
            continue
        stack.extend((child, depth + 1) for child in reversed(item))


def _plain_leaves(values: list, dtype: int) -> bool:
    """Whether every value is one `_scalar` takes as is: a str for a string input, an int or
    float (not a bool) within range for a float input. (Types are collected with `map`, not
    a generator: this runs over every value of a request.)"""
    if dtype not in _PLAIN_TYPES:
        return False
    if not set(map(type, values)) <= _PLAIN_TYPES[dtype]:
        return False
    return dtype != types_pb2.DT_FLOAT or not values or max(map(abs, values)) <= _FLOAT32_MAX


def _leaves(values: list, dtype: int) -> list:
    if dtype == types_pb2.DT_STRING:
        return [v.encode() for v in values]
    return [float(v) for v in values]


def _tensor(value: Any, dtype: int) -> tuple[list[int], list]:
    shape = _shape(value)
    values: list = []
    _fill(value, shape, dtype, values)
    return shape, values


def _array(shape: list[int], values: list, dtype: int) -> np.ndarray:
    array = np.empty(len(values), dtype=numpy_dtype(dtype_name(dtype)))
    array[:] = values
    return array.reshape(shape)


def request_tensors(body: Any, inputs: Mapping[str, int]) -> tuple[dict, str]:
    """A predict request's JSON body -> ({input: numpy array}, ROW or COLUMNAR).

    Arrays, not TensorProtos: the server checks them against the signature as it checks a
    gRPC request's tensors, and a REST request then never pays for a proto it does not need
    (only a sampled request log writes one).

    `inputs`: the signature's input names -> dtype enums. Follows
    `FillPredictRequestFromJson` (body checks) and the instances / inputs fillers.
    """
    if not isinstance(body, dict):
        raise JsonTensorError(f"JSON Value: {_debug(body)} Is not object")
    if not inputs:
        raise JsonTensorError("Failed to get input map for signature")
    if "instances" in body and "inputs" in body:
        raise JsonTensorError(f"JSON Value: {_debug(body)} Not formatted correctly expecting "
                              "only one of 'inputs' or 'instances' keys to exist ")
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list):
            raise JsonTensorError(
                f"JSON Value: {_debug(body)} Expecting 'instances' to be an list/array")
        if not rows:
            raise JsonTensorError(f"JSON Value: {_debug(body)} No values in 'instances' array")
        return _from_instances(rows, inputs), ROW
    if "inputs" in body:
        return _from_inputs(body["inputs"], inputs), COLUMNAR
    raise JsonTensorError("Missing 'inputs' or 'instances' key")


def _plain_instances(rows: list, inputs: Mapping[str, int]) -> dict | None:
    """The instances' arrays, read a column at a time, when every row is an object naming
    exactly the inputs and every input is, in every row, a plain leaf (`_plain_leaves`) or a
    list of as many plain leaves; None otherwise (the general path then checks them value by
    value, with TF Serving's messages).

    Why: a batch of 32 users is ~160 small tensors; one call per value and per tensor was
    most of a request's decoding time, all of it holding the interpreter lock.
    """
    names = set(inputs)
    if not all(type(row) is dict and row.keys() == names for row in rows):
        return None
    arrays = {}
    for name, dtype in inputs.items():
        column = [row[name] for row in rows]
        if all(type(item) is list for item in column):
            width = len(column[0])
            if not width or any(len(item) != width for item in column):
                return None
            flat = [leaf for item in column for leaf in item]
            shape = [len(rows), width]
        else:
            flat, shape = column, [len(rows)]
        if not _plain_leaves(flat, dtype):  # nested lists, bools, b64 objects, ...
            return None
        arrays[name] = _array(shape, _leaves(flat, dtype), dtype)
    return arrays


def _from_instances(rows: list, inputs: Mapping[str, int]) -> dict:
    """`FillTensorMapFromInstancesList`: plain batches a column at a time, others checked
    value by value."""
    plain = _plain_instances(rows, inputs)
    return plain if plain is not None else _checked_instances(rows, inputs)


def _checked_instances(rows: list, inputs: Mapping[str, int]) -> dict:
    """`FillTensorMapFromInstancesList`, value by value, with its error messages."""
    objects = isinstance(rows[0], dict) and not _is_b64(rows[0])
    if not objects and len(inputs) > 1:
        raise JsonTensorError("instances is a plain list, but expecting list of objects as "
                              "multiple input tensors required as per tensorinfo_map")
    names = sorted(inputs)
    values: dict[str, list] = {name: [] for name in names}
    shapes: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        is_object = isinstance(row, dict) and not _is_b64(row)
        if objects != is_object:
            raise JsonTensorError(
                f"Expecting {'object but got list' if objects else 'value/list but got object'}"
                f" at item {index} of input list")
        items = row if objects else {names[0]: row}
        for name, item in items.items():
            if name not in inputs:
                raise JsonTensorError(f"Failed to process element: {index} key: {name} of "
                                      f"'instances' list. Error: JSON object: does not have "
                                      f"named input: {name}")
            try:
                shape, leaves = _tensor(item, inputs[name])
            except JsonTensorError as error:
                raise JsonTensorError(f"Failed to process element: {index} key: {name} of "
                                      f"'instances' list. Error: {error}") from None
            if name in shapes and shapes[name] != shape:
                raise JsonTensorError(f"Failed to process element: {index} key: {name} of "
                                      f"'instances' list. Error: Expecting shape "
                                      f"{shapes[name]} but got: {shape}")
            shapes[name] = shape
            values[name].extend(leaves)
        if set(items) != set(names):
            raise JsonTensorError(f"Failed to process element: {index} of 'instances' list. "
                                  f"JSON object: {_debug(row)} keys must be equal to: "
                                  f"{','.join(names)}")
    return {name: _array([len(rows), *shapes[name]], values[name], inputs[name])
            for name in names}


def _from_inputs(value: Any, inputs: Mapping[str, int]) -> dict:
    """`FillTensorMapFromInputsMap`."""
    if not isinstance(value, dict) or _is_b64(value):
        if len(inputs) > 1:
            raise JsonTensorError("inputs is a plain value/list, but expecting an object as "
                                  "multiple input tensors required as per tensorinfo_map")
        name = next(iter(inputs))
        return {name: _array(*_tensor(value, inputs[name]), inputs[name])}
    tensors = {}
    for name in sorted(inputs):
        if name not in value:
            raise JsonTensorError(f"Missing named input: {name} in 'inputs' object.")
        tensors[name] = _array(*_tensor(value[name], inputs[name]), inputs[name])
    return tensors


def _float_formats(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`WriteDecimal` as printf formats: (one format per value, the finite values to fill in).

    TF Serving prints a float as `absl::StrCat` does (`%g`, six significant digits) when that
    reads back to the same value, else with `max_digits10` digits (`%.9g` for float32,
    `%.17g` for float64); appends `.0` to a whole number without an exponent; and writes NaN
    and ±Infinity bare (kWriteNanAndInfFlag). So float32 0.2 is `0.2`, not the
    `0.20000000298023224` of its float64 repr, and 3 is `3.0`.

    For float32, whether six digits read back is decided for the whole array at once
    (rounded in float64, then checked exactly by formatting the few that pass), because one
    `%` over a row's format string is what makes the answer affordable: formatting is most of
    a large answer's cost. A value for which float64 rounding misses a six-digit form (a
    decimal tie) is printed with nine digits: a longer text of the same float. float64 values
    are each checked by printing them.
    """
    values = flat.astype(np.float64)
    precision = 9 if flat.dtype == np.float32 else 17
    finite = np.isfinite(values)
    with np.errstate(all="ignore"):
        magnitude = np.abs(np.where(finite, values, 1.0))
        exponent = np.floor(np.log10(np.where(magnitude > 0, magnitude, 1.0)))
        scale = 10.0 ** (5 - exponent)
        six = np.round(values * scale) / scale
        short = finite & np.isfinite(six) & (six.astype(flat.dtype) == flat)
    if flat.dtype != np.float32:  # float64 rounding is no test for float64 values: print all
        short = finite.copy()
    candidates = np.flatnonzero(short)
    if candidates.size:
        printed = np.array([f"{v:g}" for v in values[candidates].tolist()], dtype=np.float64)
        short[candidates[printed.astype(flat.dtype) != flat[candidates]]] = False
    whole = finite & (values == np.trunc(values)) & (
        magnitude < np.where(short, 1e6, 10.0 ** precision))
    code = np.where(short, 0, 2) + whole
    code = np.where(np.isnan(values), 4, np.where(np.isinf(values), 5 + (values < 0), code))
    formats = np.array(["%g", "%g.0", f"%.{precision}g", f"%.{precision}g.0",
                        "NaN", "Infinity", "-Infinity"], dtype=object)
    return formats[code], values


def _nest(tokens: list[str], shape: tuple[int, ...]) -> str:
    """Leaf texts in row-major order -> the JSON text of nested lists of `shape`."""
    if not shape:
        return tokens[0]
    groups = tokens
    for level in range(len(shape) - 1, -1, -1):
        size = shape[level]
        groups = ["[" + ",".join(groups[i * size:(i + 1) * size]) + "]"
                  for i in range(math.prod(shape[:level]))]
    return groups[0]


def _row_texts(array: np.ndarray, as_bytes: bool) -> list[str]:
    """The JSON text of each entry along the first axis (`AddTensorValues` per row)."""
    if array.dtype.kind == "f":
        flat = array.ravel()
        formats, values = _float_formats(flat)
        finite = np.isfinite(values)
        size, shape = math.prod(array.shape[1:]), array.shape[1:]
        texts = []
        for row in range(array.shape[0]):
            cut = slice(row * size, (row + 1) * size)
            fill = values[cut] if finite[cut].all() else values[cut][finite[cut]]
            texts.append(_nest(formats[cut].tolist(), shape) % tuple(fill.tolist()))
        return texts
    if array.dtype == object or array.dtype.kind in "SU":
        flat = array.ravel().tolist()
        texts = None if as_bytes else _plain_string_rows(flat, array.shape)
        if texts is not None:
            return texts
        if as_bytes:  # `{"b64": ...}` objects
            values = [{"b64": base64.b64encode(b).decode()} for b in flat]
        else:
            values = _decoded(flat)
        leaves = np.empty(len(values), dtype=object)  # never nests the b64 objects
        leaves[:] = values
        rows = leaves.reshape(array.shape).tolist()
    else:
        rows = array.tolist()
    return [json.dumps(row, ensure_ascii=False, separators=(",", ":")) for row in rows]


def _plain_string_rows(flat: list, shape: tuple[int, ...]) -> list[str] | None:
    """The rows' JSON texts written by joining, when every value is UTF-8 bytes that JSON
    writes unescaped (no quote, backslash or control character) and rows are scalars or
    non-empty lists; None otherwise (the general path then writes them value by value).

    Why: a recommend answer is mostly item ids, 3,200 for 32 users of top 100; quoting and
    escaping each through `json.dumps` was a third of the answer's cost.
    """
    if not flat or len(shape) > 2 or 0 in shape:
        return None
    try:
        joined = b"".join(flat)
    except TypeError:  # a value that is not bytes
        return None
    if _ESCAPED.search(joined):
        return None
    tokens = _split_decoded(flat, "strict")
    if tokens is None:  # invalid UTF-8: the general path replaces it value by value
        return None
    if len(shape) == 1:
        return ['"' + token + '"' for token in tokens]
    size = shape[1]
    return ['["' + '","'.join(tokens[row * size:(row + 1) * size]) + '"]'
            for row in range(shape[0])]


def _split_decoded(flat: list, errors: str) -> list[str] | None:
    """Bytes values as text in one decode of their joined bytes (a large answer has thousands
    of item ids), or None when they are not all bytes, a value holds the separator, or (with
    errors="strict") a value is not UTF-8. The separator is ASCII, so a sequence split across
    values stays as invalid as it is alone."""
    try:
        joined = b"\n".join(flat)
    except TypeError:  # a value that is not bytes
        return None
    if joined.count(b"\n") != len(flat) - 1:
        return None
    try:
        return joined.decode("utf-8", errors).split("\n")
    except UnicodeDecodeError:
        return None


def _decoded(flat: list) -> list[str]:
    """Strings as text (bytes as UTF-8, invalid sequences replaced)."""
    if not flat:
        return []
    tokens = _split_decoded(flat, "replace")
    if tokens is not None:
        return tokens
    return [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in flat]


def _text(array: np.ndarray, as_bytes: bool) -> str:
    """The JSON text of a whole output (a bare value for a scalar)."""
    if array.ndim == 0:
        return _row_texts(array.reshape(1), as_bytes)[0]
    return "[" + ",".join(_row_texts(array, as_bytes)) + "]"


def response_body(outputs: Mapping[str, Any], form: str) -> bytes:
    """`MakeJsonFromTensors`: outputs (numpy arrays or TensorProtos) as the JSON text TF
    Serving answers, in row or columnar form; an output whose name ends in `_bytes` is
    written as base64 objects (`IsNamedTensorBytes`).

    Written as text, not through `json.dumps` of Python values, because floats must be
    printed as `WriteDecimal` prints them (see `_float_formats`).
    """
    if not outputs:
        raise JsonTensorError("Cannot convert empty tensor map to JSON")
    arrays = {name: outputs[name] if isinstance(outputs[name], np.ndarray)
              else to_ndarray(outputs[name]) for name in sorted(outputs)}
    as_bytes = {name: name.endswith("_bytes") for name in arrays}
    keys = {name: json.dumps(name, ensure_ascii=False) for name in arrays}
    if form == COLUMNAR:
        texts = {name: _text(a, as_bytes[name]) for name, a in arrays.items()}
        if len(texts) == 1:
            return f'{{"outputs":{next(iter(texts.values()))}}}'.encode()
        body = ",".join(f"{keys[name]}:{text}" for name, text in texts.items())
        return f'{{"outputs":{{{body}}}}}'.encode()
    batch = {a.shape[0] if a.ndim else -1 for a in arrays.values()}
    if len(batch) != 1 or -1 in batch:
        raise JsonTensorError("Tensor outputs have no common batch size")
    # each output converted once, whole, then cut into rows (a call per row costs more)
    columns = {name: _row_texts(a, as_bytes[name]) for name, a in arrays.items()}
    if len(columns) == 1:
        rows = next(iter(columns.values()))
    else:
        names = list(columns)
        rows = ["{" + ",".join(f"{keys[name]}:{text}" for name, text in zip(names, values)) + "}"
                for values in zip(*columns.values())]
    return ('{"predictions":[' + ",".join(rows) + "]}").encode()
