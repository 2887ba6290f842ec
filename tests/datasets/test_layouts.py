"""Layout detection and config overrides: the public entry point, on tiny hand-written folders.

Each layout's own rows are tested next to its reader (`test_movielens`, `test_generic_tables`);
the helpers below are shared with them.
"""

from __future__ import annotations

import pytest

from recsys_cvae.datasets import layouts as L
from tests.builders import write_raw


def test_detection_errors_name_the_directory(tmp_path):
    with pytest.raises(L.InputError, match="missing: data directory not found"):
        L.detect_layout(str(tmp_path / "missing"))
    with pytest.raises(L.InputError, match="no input layout recognised; expected u.data"):
        L.detect_layout(str(tmp_path))
    write_raw(tmp_path / "interactions.csv", "user,item\n1,2\n")
    with pytest.raises(L.InputError, match="interactions.csv: header must name user_id"):
        L.detect_layout(str(tmp_path))
    write_raw(tmp_path / "u.data", "1\t2\t3\t4\n")
    with pytest.raises(L.InputError, match="holds u.data, interactions.csv; keep the files"):
        L.detect_layout(str(tmp_path))


def test_attribute_names_must_be_usable(tmp_path):
    write_raw(tmp_path / "interactions.csv", "user_id,item_id\nu1,i1\n")
    write_raw(tmp_path / "users.csv", "user_id,home town\nu1,x\n")
    with pytest.raises(L.InputError, match="column 'home town' cannot be an attribute name"):
        L.detect_layout(str(tmp_path))
    assert L.detect_layout(str(tmp_path), drop_attributes=["home town"]).attributes == ()


def test_generic_csv_overrides_are_checked(tmp_path):
    write_raw(tmp_path / "interactions.csv", "user_id,item_id\nu1,i1\n")
    write_raw(tmp_path / "users.csv", "user_id,age,plan\nu1,x,free\n")
    layout = L.detect_layout(str(tmp_path), numeric=["age"], drop_attributes=["plan"])
    assert layout.attributes == ("age",)
    with pytest.raises(L.BadRow, match="age 'x' is not a number"):
        layout.parse(L.USERS, b"u1,x,free")
    with pytest.raises(L.InputError, match=r"users.csv: features.numeric names \['height'\]"):
        L.detect_layout(str(tmp_path), numeric=["height"])
