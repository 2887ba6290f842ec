"""Ranking primitives of the numpy baselines: top-k per user with the history excluded.

Why a module of its own: the baselines, segment popularity and the item-item blend's
validation all rank `[users, num_items]` scores this way, and the shared-row fast path
(`SharedScores`, `top_unseen_shared`) must give exactly `top_unseen`'s order, so the two
live together. ("Unseen": a user's own history items are never among their top k.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recsys_cvae.histories import Histories, ranges


@dataclasses.dataclass(frozen=True)
class SharedScores:
    """Scores of a chunk of users who share a few distinct rows (popularity, segments).

    Why not a dense matrix: every user of a segment has the same scores, so ranking each
    distinct row once and skipping each user's history (`top_unseen_shared`) replaces a
    [users, num_items] partition per chunk; at ML-20M size that made the popularity
    baselines the slowest stage. A scorer that returns the same `table` object for every
    chunk has it sorted once per split.

    Attributes:
      table: [num_distinct, num_items] float scores.
      row_of: [num_rows] int, the table row of each user of the chunk.
    """

    table: np.ndarray
    row_of: np.ndarray

    def dense(self) -> np.ndarray:
        """[num_rows, num_items]: what a dense scorer would have returned."""
        return self.table[self.row_of]


def top_unseen(scores: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-first item indices and scores per row, skipping excluded items.

    Args:
      scores: [num_users, num_items] float.
      exclude: [num_users, num_items] bool, True for items never to return (the history).
      k: list length.

    Returns:
      ([num_users, k'] int indices, [num_users, k'] float32 scores), k' = min(k, num_items);
      ties go to the lower item index (the more popular item in vocabulary order); excluded
      slots at the end of a short row hold index -1.
    """
    masked = np.where(exclude, -np.inf, scores)
    num_items = scores.shape[1]
    k = min(k, num_items)
    if k == 0 or len(masked) == 0:
        empty = np.zeros((len(masked), k))
        return empty.astype(np.int64), empty.astype(np.float32)
    # Only items scoring at least the row's k-th best can make its top k: gather them (in
    # index order) into a padded [rows, width] block and sort just that block. A full argsort
    # of every row cost ~6 ms per user at 26,744 items.
    kth = np.partition(masked, num_items - k, axis=1)[:, num_items - k]
    rows, columns = np.nonzero(masked >= kth[:, None])
    counts = np.bincount(rows, minlength=len(masked))
    slots = ranges(np.zeros_like(counts), counts)  # each entry's place within its row
    index = np.zeros((len(masked), int(counts.max())), dtype=np.int64)
    values = np.full(index.shape, -np.inf)  # padding: never above a real candidate
    index[rows, slots] = columns
    values[rows, slots] = masked[rows, columns]
    within = np.argsort(-values, axis=1, kind="stable")[:, :k]
    order = np.take_along_axis(index, within, axis=1)
    best = np.take_along_axis(values, within, axis=1)
    order = np.where(np.isneginf(best), -1, order)
    return order, best.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SortedTable:
    """A `SharedScores.table` with each row's items ranked once, for `top_unseen_shared`.

    Attributes:
      table: [num_distinct, num_items] float scores.
      order: [num_distinct, num_items] int64 items of each row best first, ties to the lower
        index (`top_unseen`'s order).
      position: [num_distinct, num_items] int32 inverse of `order`: where each item stands.
    """

    table: np.ndarray
    order: np.ndarray
    position: np.ndarray


def sort_table(table: np.ndarray) -> SortedTable | None:
    """Ranks every row of a shared table; None when it holds NaN, whose order only `top_unseen`
    defines (the caller then densifies)."""
    if np.isnan(table).any():
        return None
    order = np.argsort(-table, axis=1, kind="stable")
    position = np.empty(order.shape, dtype=np.int32)
    ranks = np.broadcast_to(np.arange(order.shape[1], dtype=np.int32), order.shape)
    np.put_along_axis(position, order, ranks, axis=1)
    return SortedTable(table, order, position)


def top_unseen_shared(
    ranked: SortedTable, row_of: np.ndarray, history: Histories, rows: slice, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k(ranked.table[row_of], history.dense(rows), k)` without a dense row per user.

    A user's list is the first k items of its row's order that are not in its history;
    the history holds at most len(history) of them, so only the first k + len(history)
    items of the order are candidates. All users of the chunk at once: each history item
    is looked up in its user's order (`position`) and, when among the candidates, dropped.

    Args:
      ranked: `sort_table(table)` of the chunk's shared table.
      row_of: [len(rows)] int, the table row of each user in rows.
      history: the split's histories; rows selects the chunk's users.
      k: list length.

    Returns:
      Exactly `top_unseen`'s ([num_users, k'] indices, [num_users, k'] float32 scores).
    """
    num_items = ranked.table.shape[1]
    k = min(k, num_items)
    users = np.arange(history.shape[0])[rows]
    starts, stops = history.indptr[users], history.indptr[users + 1]
    lengths = stops - starts
    width = np.minimum(k + lengths, num_items)
    offset = np.cumsum(width) - width  # where each user's candidates start
    user_of = np.repeat(np.arange(len(users)), width)
    table_row = row_of[user_of]
    candidates = ranked.order[table_row, ranges(np.zeros_like(width), width)]
    values = ranked.table[table_row, candidates]
    had_user = np.repeat(np.arange(len(users)), lengths)
    had = ranked.position[row_of[had_user], history.indices[ranges(starts, stops)]]
    among = had < width[had_user]
    keep = ~np.isneginf(values)  # -inf scores end a list, as in top_k
    keep[offset[had_user[among]] + had[among]] = False
    kept_user = user_of[keep]
    counts = np.bincount(kept_user, minlength=len(users))
    rank = ranges(np.zeros_like(counts), counts)
    first = rank < k
    index = np.full((len(users), k), -1, dtype=np.int64)
    best = np.full((len(users), k), -np.inf, dtype=np.float32)
    index[kept_user[first], rank[first]] = candidates[keep][first]
    best[kept_user[first], rank[first]] = values[keep][first]
    return index, best
