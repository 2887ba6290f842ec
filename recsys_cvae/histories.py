"""Users' item histories as compressed sparse rows, for the numpy baselines.

Why a module of its own: the baselines, segment popularity and the two-tower model all read
split histories, and at ML-20M size a dense `[users, items]` matrix per split does not fit
(see `Histories`). Only numpy: no new dependency for a dozen array operations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


def ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]), without the loop."""
    lengths = stops - starts
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


@dataclasses.dataclass(frozen=True)
class Histories:
    """Users' item sets as compressed sparse rows (CSR): user u holds the items
    `indices[indptr[u]:indptr[u + 1]]`, ascending and without repeats.

    Why not a dense [num_users, num_items] bool matrix: at ML-20M size (138k users x 26,744
    items) one is 3.7 GB, and the weak protocol's train, validation and test splits (each
    holding nearly every user) are alive at once; CSR holds the 20M interactions in 80 MB.
    Scorers densify one chunk of rows at a time (`dense`).

    Attributes:
      indptr: [num_users + 1] int64 row offsets into `indices`.
      indices: [num_interactions] int32 item indices.
      num_items: catalogue size (the number of columns).
    """

    indptr: np.ndarray
    indices: np.ndarray
    num_items: int

    @classmethod
    def from_rows(cls, rows: Sequence[np.ndarray], num_items: int) -> Histories:
        """From one ascending, repeat-free int array of item indices per user."""
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        indices = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)
        return cls(indptr, indices, num_items)

    @classmethod
    def from_dense(cls, matrix: np.ndarray) -> Histories:
        """From a [num_users, num_items] matrix; every non-zero entry is an interaction."""
        users, items = np.nonzero(matrix)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=len(matrix)))])
        return cls(indptr.astype(np.int64), items.astype(np.int32), matrix.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.indptr) - 1, self.num_items

    def row(self, user: int) -> np.ndarray:
        """[n] item indices of one user, ascending."""
        return self.indices[self.indptr[user] : self.indptr[user + 1]]

    def lengths(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """[len(rows)] number of items of each user in rows."""
        users = np.arange(self.shape[0])[rows]
        return self.indptr[users + 1] - self.indptr[users]

    def dense(self, rows: slice | np.ndarray = slice(None), dtype: Any = bool) -> np.ndarray:
        """[len(rows), num_items] of `dtype`, 1 where the user has the item: for a chunk of
        rows (a slice or an int array), never the whole split."""
        users = np.arange(self.shape[0])[rows]
        starts, stops = self.indptr[users], self.indptr[users + 1]
        out = np.zeros((len(users), self.num_items), dtype=dtype)
        within = np.repeat(np.arange(len(users)), stops - starts)
        out[within, self.indices[ranges(starts, stops)]] = 1
        return out

    def item_counts(self) -> np.ndarray:
        """[num_items] float64: how many users have each item (the column sums)."""
        return np.bincount(self.indices, minlength=self.num_items).astype(np.float64)

    def gram(self) -> np.ndarray:
        """XᵀX [num_items, num_items] float64: row i counts, per item j, the users having both.

        Built item by item from the users of item i (a column-sorted copy of `indices`), so
        the work is Σ_u |x_u|² index operations instead of a dense num_users x num_items²
        product, and nothing but the result is larger than the interactions. Exact (integer
        counts), so equal to the dense `X.T @ X`.
        """
        num_users, num_items = self.shape
        user_of = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(self.indptr))
        users_by_item = user_of[np.argsort(self.indices, kind="stable")]
        item_ptr = np.concatenate([[0], np.cumsum(np.bincount(self.indices, minlength=num_items))])
        gram = np.zeros((num_items, num_items))
        for i in range(num_items):
            users = users_by_item[item_ptr[i] : item_ptr[i + 1]]
            if len(users):
                positions = ranges(self.indptr[users], self.indptr[users + 1])
                gram[i] = np.bincount(self.indices[positions], minlength=num_items)
        return gram
