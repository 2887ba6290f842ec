"""The checks every layout shares once a row has named fields."""

from __future__ import annotations

import pytest

from recsys_cvae.datasets.rows import is_number


@pytest.mark.parametrize(
    "text, expected", [("3", True), ("-1.5e3", True), ("", False), ("nan", False), ("inf", False),
                       ("north", False)],
)  # fmt: skip
def test_is_number(text, expected):
    assert is_number(text) is expected
