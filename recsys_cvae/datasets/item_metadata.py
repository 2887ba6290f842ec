"""Item metadata as a matrix: which categories (genres) each catalogue item has.

Why here, with the raw layouts: the categories come from the data folder's items table
(MovieLens `u.item` genres, a generic `items.csv` column), not from the features; the
evaluation's diversity metrics and the two-tower baseline's item tower both read them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from recsys_cvae.datasets import layouts as L


class MetadataError(ValueError):
    """The item metadata source cannot be read."""


CATEGORY_COLUMNS = ("genres", "genre", "categories", "category")


def item_categories(items: Sequence[str], source: str) -> np.ndarray | None:
    """[num_items, c] 0/1 category matrix from an items file or a data folder; None if the
    source has no items table or no category column. Categories are `|`-separated."""
    table = item_category_table(items, source)
    return None if table is None else table[1]


def item_category_table(
    items: Sequence[str], source: str
) -> tuple[list[str], np.ndarray] | None:
    """(category labels, sorted; [num_items, len(labels)] 0/1 matrix), or None as
    `item_categories`: the export's policy names categories by label."""
    if not source:
        return None
    data_dir = source if os.path.isdir(source) else os.path.dirname(source)
    try:
        layout = L.detect_layout(data_dir)
    except Exception as error:  # a folder without interactions is no data folder
        raise MetadataError(f"{source}: cannot read item metadata ({error})") from None
    metadata = L.read_items(layout)
    column = next(
        (c for c in CATEGORY_COLUMNS if any(c in row for row in metadata.values())), None
    )
    if column is None:
        return None
    labels = sorted({g for row in metadata.values() for g in row.get(column, "").split("|") if g})
    position = {g: j for j, g in enumerate(labels)}
    matrix = np.zeros((len(items), len(labels)), dtype=np.float32)
    for i, item in enumerate(items):
        for g in metadata.get(item, {}).get(column, "").split("|"):
            if g in position:
                matrix[i, position[g]] = 1.0
    return labels, matrix
