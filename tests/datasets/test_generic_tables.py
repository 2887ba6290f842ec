"""The generic CSV and Parquet layouts, detected and parsed through `layouts`."""

from __future__ import annotations

import pandas as pd
import pytest

from recsys_cvae.datasets import layouts as L
from recsys_cvae.datasets.generic_tables import infer_kind
from tests.builders import parsed_rows, write_raw


def test_generic_csv(tmp_path):
    write_raw(
        tmp_path / "interactions.csv",
        "\ufeffuser_id,item_id,rating,source\n"  # BOM and an extra column, which is ignored
        'u1,i1,4,"web,app"\n'
        "u1,,5,web\n"
        "u2,i2,nan,web\n"
        "u2,i3,4\n"
        "\n"
        "u3,i1,2.5,app\n",
    )
    write_raw(tmp_path / "users.csv", "user_id,age,zip\nu1,31,01234\nu2,,99999\n")
    layout = L.detect_layout(str(tmp_path), categorical=["zip"])
    assert layout.name == L.CSV and layout.has_rating and not layout.has_timestamp
    assert layout.attributes == ("age", "zip") and layout.kinds == {"zip": "categorical"}

    results = []
    for line, raw in L.iter_raw_rows(layout, L.INTERACTIONS):
        try:
            results.append((line, layout.parse(L.INTERACTIONS, raw)))
        except L.BadRow as bad:
            results.append((line, bad.reason))
    # Line 1 is the header, line 6 is blank (not a row).
    assert results == [
        (2, L.Interaction("u1", "i1", 4.0, None)),
        (3, "empty_item_id"),
        (4, "bad_rating"),
        (5, "wrong_field_count"),
        (7, L.Interaction("u3", "i1", 2.5, None)),
    ]
    assert parsed_rows(layout, L.USERS) == [
        (2, L.UserRow("u1", {"age": "31", "zip": "01234"})),
        (3, L.UserRow("u2", {"age": "", "zip": "99999"})),
    ]


def test_parquet(tmp_path):
    pd.DataFrame(
        {"user_id": [1, 2], "item_id": [10.0, 20.0], "rating": [4.0, float("nan")]}
    ).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"user_id": [1], "age": [30.5], "plan": ["free"]}).to_parquet(
        tmp_path / "users.parquet"
    )
    layout = L.detect_layout(str(tmp_path))
    assert layout.name == L.PARQUET and layout.attributes == ("age", "plan")
    raw = list(L.iter_raw_rows(layout, L.INTERACTIONS))
    # Integer-valued ids read as the strings a CSV would hold: 10.0 -> "10".
    assert layout.parse(L.INTERACTIONS, raw[0][1]) == L.Interaction("1", "10", 4.0, None)
    with pytest.raises(L.BadRow) as bad:
        layout.parse(L.INTERACTIONS, raw[1][1])  # a null rating
    assert bad.value.reason == "bad_rating"
    assert parsed_rows(layout, L.USERS) == [(1, L.UserRow("1", {"age": "30.5", "plan": "free"}))]


def test_infer_kind():
    assert infer_kind(values_are_numeric=True, any_value=True) == "numeric"
    assert infer_kind(values_are_numeric=False, any_value=True) == "categorical"
    assert infer_kind(values_are_numeric=True, any_value=False) == "categorical"  # all empty
