"""The MovieLens-100K and -1M layouts, detected and parsed through `layouts`."""

from __future__ import annotations

import pytest

from recsys_cvae.datasets import layouts as L
from tests.builders import parsed_rows, write_raw


def test_ml_100k(tmp_path):
    write_raw(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    write_raw(tmp_path / "u.user", "1|24|M|technician|85711\n2|53|F|other|T8H1N\n")
    flags = "|".join(["0"] * 19)
    comedy = "|".join(["0"] * 5 + ["1"] + ["0"] * 13)  # flag 5 = Comedy
    write_raw(
        tmp_path / "u.item",
        f"242|Kolya (1996)|24-Jan-1997||http://x|{comedy}\n"
        f"302|Café (1997)|01-Jan-1997||u|{flags}\n",
        encoding="latin-1",
    )
    layout = L.detect_layout(str(tmp_path))
    assert layout.name == L.ML_100K and layout.has_rating and layout.has_timestamp
    assert layout.attributes == ("age", "gender", "occupation", "zip_region")
    assert layout.kinds["age"] == "numeric" and layout.kinds["zip_region"] == "categorical"
    # zip_region is derived from the raw zip_code column; the spec and the export say so.
    assert layout.derived == {"zip_region": ("zip_code", "first_char_upper")}
    assert parsed_rows(layout, L.INTERACTIONS) == [
        (1, L.Interaction("196", "242", 3.0, 881250949.0)),
        (2, L.Interaction("186", "302", 3.0, 891717742.0)),
    ]
    # zip_region is the first character of the zip code, letters upper-cased.
    assert parsed_rows(layout, L.USERS)[1] == (
        2,
        L.UserRow("2", {"age": "53", "gender": "F", "occupation": "other", "zip_region": "T"}),
    )
    assert layout.parse(L.USERS, b"3|30|M|writer|e1a 2b3").attributes["zip_region"] == "E"
    assert layout.parse(L.USERS, b"4|30|M|writer|").attributes["zip_region"] == ""
    items = L.read_items(layout)
    assert items["242"]["genres"] == "Comedy" and items["302"]["title"] == "Café (1997)"
    with pytest.raises(L.BadRow) as bad:
        layout.parse(L.USERS, b"3|old|M|writer|12345")  # age must be a number
    assert bad.value.reason == "bad_attribute"
    with pytest.raises(L.BadRow) as bad:
        layout.parse(L.INTERACTIONS, b"196\t242\t3")
    assert bad.value.reason == "wrong_field_count"


def test_ml_1m(tmp_path):
    write_raw(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::x::978302109\n")
    write_raw(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n3::M::17::1::1\n")
    write_raw(tmp_path / "movies.dat", "1193::Nausicaä (1984)::Animation|Fantasy\n", "latin-1")
    layout = L.detect_layout(str(tmp_path))
    assert layout.name == L.ML_1M and layout.encoding == "latin-1"
    assert layout.attributes == ("gender", "age", "occupation", "zip_region")
    assert all(layout.kinds[name] == "categorical" for name in layout.attributes)
    assert layout.parse(L.INTERACTIONS, b"1::1193::5::978300760") == L.Interaction(
        "1", "1193", 5.0, 978300760.0
    )
    with pytest.raises(L.BadRow) as bad:
        layout.parse(L.INTERACTIONS, b"1::661::x::978302109")
    assert bad.value.reason == "bad_rating"
    assert layout.parse(L.USERS, b"2::M::56::16::70072") == L.UserRow(
        "2", {"gender": "M", "age": "56", "occupation": "16", "zip_region": "7"}
    )
    with pytest.raises(L.BadRow) as bad:
        layout.parse(L.USERS, b"3::M::17::1::1")  # 17 is not an ml-1m age bucket code
    assert bad.value.reason == "bad_attribute"
    assert L.read_items(layout) == {
        "1193": {"title": "Nausicaä (1984)", "genres": "Animation|Fantasy"}
    }


def test_derived_attributes_follow_the_overrides(tmp_path):
    write_raw(tmp_path / "u.data", "196\t242\t3\t881250949\n")
    write_raw(tmp_path / "u.user", "1|24|M|technician|85711\n")
    dropped = L.detect_layout(str(tmp_path), drop_attributes=["zip_region"])
    assert "zip_region" not in dropped.attributes and dropped.derived == {}
    with pytest.raises(L.InputError, match=r"features.numeric names \['zip_region'\], derived"):
        L.detect_layout(str(tmp_path), numeric=["zip_region"])
