"""Named derivations (Python twin = TensorFlow twin, projections) and the spec's record of them."""

from __future__ import annotations

import dataclasses
import math

import pytest
import tensorflow as tf

from recsys_cvae import derivations as D
from recsys_cvae import spec as S

# Empty, zip codes (US, Canadian, lower case), already-derived values, digits, whitespace,
# punctuation, non-ASCII letters (one code point, two, full-case-mapping traps such as "ß"
# -> "SS" and the "ǆ" digraph), CJK, emoji (4 UTF-8 bytes), combining marks, NUL.
STRINGS = [
    "", "55105", "02139", "e1a 2b3", "E1A 2B3", "T8H1N", "t8h1n", "v3n4p", "5", "E", "e", "z",
    "Z", "0", "9", "-", " ", " 55105", "\t9", "?", "abc", "ABC", "é", "É", "éa", "ß", "ßa",
    "ǆ", "ǅ", "ı", "i", "ﬁ", "ŉ", "Ω", "ω", "中国", "😀", "😀x", "e\u0301", "\u0301e", "\x00a",
    "ÿ", "Ÿ", "µ", "ᾳ", "ñ123", "Ǳ", "ǲ", "aé", "1é",
]  # fmt: skip


def tensor_derive(name: str, values: list[str]) -> list[str]:
    out = D.derive_tensor(name, tf.constant([v.encode("utf-8") for v in values], tf.string))
    return [v.decode("utf-8") for v in out.numpy().tolist()]


@pytest.mark.parametrize("name", sorted(D.NAMES))
def test_python_and_tensorflow_twins_agree(name):
    python = [D.derive(name, value) for value in STRINGS]
    assert tensor_derive(name, STRINGS) == python
    # and inside a traced graph (the export), on a [batch, 1] tensor too
    graph = tf.function(lambda x: D.derive_tensor(name, x))
    column = tf.constant([[v.encode("utf-8")] for v in STRINGS])
    assert [row[0].decode("utf-8") for row in graph(column).numpy().tolist()] == python


@pytest.mark.parametrize("name", sorted(D.NAMES))
def test_every_derivation_is_a_projection(name):
    # The records hold derive(x); fed back as the raw input it must give derive(x) again.
    once = [D.derive(name, value) for value in STRINGS]
    assert [D.derive(name, value) for value in once] == once
    assert tensor_derive(name, tensor_derive(name, STRINGS)) == tensor_derive(name, STRINGS)


def test_first_char_upper():
    derive = lambda value: D.derive(D.FIRST_CHAR_UPPER, value)  # noqa: E731
    assert [derive(v) for v in ("55105", "e1a 2b3", "", "T8H1N", "é", "ß", "😀x")] == [
        "5", "E", "", "T", "é", "ß", "😀"
    ]  # fmt: skip


def test_bytes_that_are_not_utf8_become_an_unknown_value_not_an_error():
    # A client may send any bytes; the feature job's Python only ever sees decoded text.
    raw = [b"\xff5", b"\xc3", b"5\xff", b"\xe2\x82"]
    out = D.derive_tensor(D.FIRST_CHAR_UPPER, tf.constant(raw)).numpy().tolist()
    assert [v.decode("utf-8") for v in out] == [
        D.derive(D.FIRST_CHAR_UPPER, b.decode("utf-8", errors="replace")) for b in raw
    ]
    assert out == ["\ufffd".encode(), "\ufffd".encode(), b"5", "\ufffd".encode()]


def test_unknown_derivation_names_are_refused():
    with pytest.raises(D.DerivationError, match="unknown derivation 'zip3'"):
        D.derive("zip3", "55105")
    with pytest.raises(D.DerivationError, match="first_char_upper"):
        D.derive_tensor("zip3", tf.constant(["55105"]))


# ---- the spec's record of derivations --------------------------------------------------------


def zip_region(**fields) -> S.AttributeSpec:
    fields = {"derived_from": "zip_code", "derivation": D.FIRST_CHAR_UPPER, **fields}
    return S.AttributeSpec("zip_region", S.CATEGORICAL, "vocab/attr_zip_region.txt", 3, **fields)


def spec_of(*attributes: S.AttributeSpec) -> S.FeatureSpec:
    return S.FeatureSpec(attributes, "vocab/items.txt", 3, {"train": S.SplitSpec("t/*", 1)})


def test_spec_json_round_trips_derivations_and_loads_old_specs_as_before():
    gender = S.AttributeSpec("gender", S.CATEGORICAL, "vocab/attr_gender.txt", 2)
    spec = spec_of(gender, zip_region())
    data = spec.to_json()
    assert data["attributes"][1]["derived_from"] == "zip_code"
    assert data["attributes"][1]["derivation"] == "first_char_upper"
    assert "derived_from" not in data["attributes"][0]  # raw attributes: no new keys
    assert S.FeatureSpec.from_json(data).attributes == spec.attributes
    # A spec written before derivations were recorded loads as before: raw attributes.
    old = dict(data, attributes=[{"name": "zip_region", "kind": "categorical",
                                  "vocabulary_file": "vocab/attr_zip_region.txt",
                                  "vocabulary_size": 3, "num_oov_buckets": 1,
                                  "mean": 0.0, "std": 1.0, "source": "users"}])  # fmt: skip
    loaded = S.FeatureSpec.from_json(old)
    assert loaded.attribute("zip_region").derivation is None
    assert S.serving_inputs(loaded) == [
        S.ServingInput("zip_region", S.CATEGORICAL, ("zip_region",), "zip_region")
    ]


def test_bad_derivations_are_refused():
    with pytest.raises(S.SpecError, match="go together"):
        zip_region(derivation=None)
    with pytest.raises(S.SpecError, match="unknown derivation 'zip3'"):
        zip_region(derivation="zip3")
    with pytest.raises(S.SpecError, match="cannot be a raw column"):
        zip_region(derived_from="user_id")
    with pytest.raises(S.SpecError, match="categorical, not 'numeric'"):
        S.AttributeSpec("z", S.NUMERIC, derived_from="zip_code", derivation=D.FIRST_CHAR_UPPER)
    numeric_zip = S.AttributeSpec("zip_code", S.NUMERIC)
    with pytest.raises(S.SpecError, match="numeric attribute and the source"):
        spec_of(numeric_zip, zip_region())
    # `zip_region` read raw by one attribute and derived from `zip_code` by another
    other = S.AttributeSpec("o", S.CATEGORICAL, "v.txt", 1, derived_from="zip_region",
                            derivation=D.FIRST_CHAR_UPPER)
    with pytest.raises(S.SpecError, match="cannot be both"):
        spec_of(zip_region(), other)


def test_serving_inputs_are_the_raw_columns_one_per_column():
    age = S.AttributeSpec("age", S.NUMERIC, mean=30.0, std=5.0)
    zip_code = S.AttributeSpec("zip_code", S.CATEGORICAL, "vocab/attr_zip_code.txt", 9)
    initial = dataclasses.replace(zip_region(), name="zip_initial",
                                  vocabulary_file="vocab/attr_zip_initial.txt")
    # zip_region and zip_initial derive from one column: one input
    spec = spec_of(age, zip_region(), initial)
    assert S.serving_inputs(spec) == [
        S.ServingInput("age", S.NUMERIC, ("age",), "age"),
        S.ServingInput("zip_code", S.CATEGORICAL, ("zip_region", "zip_initial"), "zip_region"),
    ]
    # with the raw column an attribute too, it is what the records feed the input from
    both = spec_of(zip_region(), zip_code)
    assert S.serving_inputs(both) == [
        S.ServingInput("zip_code", S.CATEGORICAL, ("zip_region", "zip_code"), "zip_code")
    ]
    stored = {"age": 31.0, "zip_region": "5", "zip_initial": "5", "zip_code": "55105"}
    assert S.inputs_from_attributes(spec, stored) == {"age": 31.0, "zip_code": "5"}
    assert S.inputs_from_attributes(both, stored) == {"zip_code": "55105"}
    # a caller's raw profile -> the attributes the graph computes
    assert S.attributes_from_inputs(spec, {"age": 31.0, "zip_code": "e1a 2b3"}) == {
        "age": 31.0, "zip_region": "E", "zip_initial": "E"
    }
    unknown = S.attributes_from_inputs(spec, {"age": math.nan, "zip_code": ""})
    assert math.isnan(unknown["age"]) and unknown["zip_region"] == unknown["zip_initial"] == ""
    assert S.attributes_from_inputs(both, {"zip_code": "e1a 2b3"}) == {
        "zip_region": "E", "zip_code": "e1a 2b3"
    }


def test_a_column_no_stored_attribute_can_feed_is_refused_when_fed_from_records(monkeypatch):
    # Two different derivations of one column, without the column stored: derive_a(stored_b)
    # need not be stored_a, so the records cannot stand in for the raw column.
    monkeypatch.setattr(D, "NAMES", D.NAMES | {"other"})
    other = dataclasses.replace(zip_region(), name="zip_other", derivation="other",
                                vocabulary_file="vocab/attr_zip_other.txt")
    spec = spec_of(zip_region(), other)
    (serving_input,) = S.serving_inputs(spec)
    assert serving_input.stored_as is None
    with pytest.raises(S.SpecError, match="records do not hold the raw column"):
        S.inputs_from_attributes(spec, {"zip_region": "5", "zip_other": "x"})
