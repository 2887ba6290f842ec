"""Users' item lists as a binary user × item matrix: what the report and the membership test
compare, built one way for both."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def item_matrix(item_lists: Sequence[Sequence[str]], index: Mapping[str, int]) -> np.ndarray:
    """`[users, items]` float32, 1 where the user has the item; ids not in `index` are left out."""
    x = np.zeros((len(item_lists), len(index)), dtype=np.float32)
    for row, items in enumerate(item_lists):
        x[row, [index[i] for i in items if i in index]] = 1.0
    return x
