"""Answer text as TF Serving writes it: tensorflow/serving util/json_tensor.cc.

The expected strings are those of util/json_tensor_test.cc where it has a case (cited by test
name); the rest follow `WriteDecimal` (json_tensor.cc): `absl::StrCat` (printf `%g`) when
that reads back to the same value, else `%.*g` with `max_digits10`; `.0` appended when the
text has neither `.` nor `e`; NaN and ±Infinity bare.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tensorflow.core.framework import types_pb2

from serving import json_tensors
from serving.json_tensors import COLUMNAR, ROW, response_body


def write_decimal(value: float, dtype: type) -> str:
    """`WriteDecimal` for one value, literally (the reference the vectorised code must match)."""
    if np.isnan(value):
        return "NaN"
    if np.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    text = f"{value:g}"
    if dtype(float(text)) != dtype(value):
        text = f"{value:.{9 if dtype is np.float32 else 17}g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def test_six_digit_precision_as_json_tensor_test():
    # JsontensorTest.FromJsonSingleFloatTensorSixDigitPrecision
    values = np.array([[9000000, 999999, 0.5], [0.0003, 0.00003, 555557.5]], np.float32)
    assert response_body({"float_tensor": values}, ROW) == (
        b'{"predictions":[[9e+06,999999.0,0.5],[0.0003,3e-05,555557.5]]}')


def test_non_finite_values_are_bare_as_json_tensor_test():
    # JsontensorTest.FromJsonSingleFloatTensorNonFinite (kWriteNanAndInfFlag)
    values = np.array([[np.nan, np.inf], [3, -np.inf]], np.float32)
    assert response_body({"float_tensor": values}, ROW) == (
        b'{"predictions":[[NaN,Infinity],[3.0,-Infinity]]}')


@pytest.mark.parametrize("value, text", [
    (0.2, "0.2"),                 # not 0.20000000298023224 (comment above WriteDecimal)
    (3.0, "3.0"),                 # whole numbers keep a '.0'
    (0.123456789, "0.123456791"),  # six digits do not read back: max_digits10 (9) digits
    (1e6, "1e+06"),
    (-0.0, "-0.0"),
    (1e-30, "1e-30"),
    (16777216.0, "16777216.0"),   # %.9g of a whole number has no '.': one is added
])
def test_float32_values_print_as_write_decimal(value, text):
    body = response_body({"score": np.array([value], np.float32)}, COLUMNAR)
    assert body == f'{{"outputs":[{text}]}}'.encode()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_values_match_write_decimal_and_read_back_exactly(dtype):
    rng = np.random.default_rng(7)
    values = np.concatenate([
        rng.standard_normal(3000) * 10.0 ** rng.integers(-12, 12, 3000),
        rng.integers(-10**7, 10**7, 500).astype(np.float64),   # whole numbers around %g's limit
        np.round(rng.random(500), 3),                          # short decimals
        [0.0, -0.0, np.nan, np.inf, -np.inf, 1.5, 2.5, 7.0]]).astype(dtype).reshape(-1, 4)
    body = response_body({"scores": values}, ROW)
    expected = "[" + ",".join(
        "[" + ",".join(write_decimal(v, dtype) for v in row) + "]" for row in values.tolist()) + "]"
    assert body == f'{{"predictions":{expected}}}'.encode()
    read_back = np.array(json.loads(body)["predictions"], dtype)
    np.testing.assert_array_equal(read_back, values)


def test_rows_with_several_outputs_and_strings():
    # MakeJsonFromTensors kRow: one object per instance, outputs in name order; strings as
    # text, `_bytes` outputs as {"b64": ...} (IsNamedTensorBytes)
    outputs = {"scores": np.array([[0.5, 0.25], [1.0, 2.0]], np.float32),
               "item_ids": np.array([[b"m1", "é".encode()], [b"m3", b""]], object),
               "raw_bytes": np.array([b"hi", b"tf"], object)}
    body = json.loads(response_body(outputs, ROW))
    assert body == {"predictions": [
        {"item_ids": ["m1", "é"], "raw_bytes": {"b64": "aGk="}, "scores": [0.5, 0.25]},
        {"item_ids": ["m3", ""], "raw_bytes": {"b64": "dGY="}, "scores": [1.0, 2.0]}]}


def test_columnar_answers_with_several_outputs_and_integers():
    outputs = {"count": np.array(3, np.int32), "ids": np.array([[1, 2]], np.int64)}
    assert response_body(outputs, COLUMNAR) == b'{"outputs":{"count":3,"ids":[[1,2]]}}'


@pytest.mark.parametrize("values", [
    [[b"m1", b"m2"], [b"m3", b""]],                    # plain: written by joining
    [[b"caf\xc3\xa9", "日本".encode()], [b"x", b"y"]],  # non-ASCII UTF-8 is written as is
    [[b'say "hi"', b"back\\slash"], [b"tab\there", b"nl\n"]],  # escaped value by value
    [[b"\xc3", b"\xa9"], [b"\xff", b"ok"]],            # invalid UTF-8, even when split
    [b"a", b"b\x00c"],                                 # rank 1, a control character
    [[[b"a"], [b"b"]], [[b"c"], [b"d"]]],              # rank 3
])
def test_string_outputs_match_json_dumps_of_the_decoded_values(values):
    # rapidjson's Writer::String (json_tensor.cc WriteString): quotes, backslashes and control
    # characters escaped, UTF-8 kept; the joining fast path must write what json.dumps writes
    array = np.array(values, dtype=object)
    expected = json.dumps(
        np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array).tolist(),
        ensure_ascii=False, separators=(",", ":"))
    assert response_body({"ids": array}, ROW) == f'{{"predictions":{expected}}}'.encode()


_INPUTS = {"item_ids": types_pb2.DT_STRING, "age": types_pb2.DT_FLOAT,
           "region": types_pb2.DT_STRING}


@pytest.mark.parametrize("rows", [
    [{"item_ids": ["m1", "m2"], "age": 30, "region": "north"},
     {"item_ids": ["m3", "é"], "age": 41.5, "region": "south"}],   # plain: read by column
    [{"item_ids": ["m1"], "age": 1e39, "region": "n"}],             # out of float32's range
    [{"item_ids": ["m1"], "age": True, "region": "n"}],             # a bool for a float
    [{"item_ids": ["m1"], "age": float("nan"), "region": "n"},
     {"item_ids": ["m2"], "age": 1e39, "region": "s"}],             # NaN, then out of range
    [{"item_ids": ["m1"], "age": float("nan"), "region": "n"},
     {"item_ids": ["m2"], "age": float("inf"), "region": "s"}],     # non-finite: accepted
    [{"item_ids": ["m1"], "age": None, "region": "n"}],             # null for a float
    [{"item_ids": ["m1"], "age": 3, "region": {"b64": "bm9ydGg="}}],  # b64 string
    [{"item_ids": ["m1", "m2"], "age": 3, "region": "n"},
     {"item_ids": ["m3"], "age": 4, "region": "s"}],                # ragged histories
    [{"item_ids": [], "age": 3, "region": "n"}],                    # an empty list
    [{"item_ids": [["m1"]], "age": 3, "region": "n"}],              # one level too deep
    [{"item_ids": ["m1"], "age": 3}],                               # a key missing
    [{"item_ids": ["m1"], "age": 3, "region": "n", "zip": "x"}],    # a key too many
    [{"item_ids": "m1", "age": [3], "region": "n"},
     {"item_ids": ["m2"], "age": 4, "region": "s"}],                # scalar and list mixed
])
def test_column_reading_answers_as_the_value_by_value_reading(rows):
    # The column-at-a-time fast path must accept only what FillTensorMapFromInstancesList
    # accepts, with the same arrays; anything else falls to the checked path and its messages.
    try:
        expected = json_tensors._checked_instances(rows, _INPUTS)
    except json_tensors.JsonTensorError as error:
        assert json_tensors._plain_instances(rows, _INPUTS) is None
        with pytest.raises(json_tensors.JsonTensorError, match=re.escape(str(error))):
            json_tensors.request_tensors({"instances": rows}, _INPUTS)
        return
    arrays, form = json_tensors.request_tensors({"instances": rows}, _INPUTS)
    assert form == ROW and arrays.keys() == expected.keys()
    for name, array in arrays.items():
        assert array.dtype == expected[name].dtype
        np.testing.assert_array_equal(array, expected[name])
