"""Top-K lists of any baseline scorer, and the validation score that tunes it.

Users are scored `CHUNK_USERS` at a time (bounded memory); a scorer that answers one shared
table row per user (`SharedScores`: popularity, segment popularity) is ranked once per
distinct row instead of once per user (`ranking.top_unseen_shared`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys_cvae.baselines.split_data import BaselineError, Scorer, SplitData
from recsys_cvae.metrics import score_rankings
from recsys_cvae.ranking import SharedScores, sort_table, top_unseen, top_unseen_shared

CHUNK_USERS = 1024


def rankings(
    scorer: Scorer, data: SplitData, items: Sequence[str], k: int
) -> tuple[list[list[str]], list[list[float]]]:
    """Item id lists and scores for every user of `data`, scored `CHUNK_USERS` at a time."""
    item_ids: list[list[str]] = []
    scores: list[list[float]] = []
    ids = np.empty(len(items), dtype=object)
    ids[:] = list(items)
    table, ranked = None, None  # the last shared table and `sort_table` of it
    for start in range(0, len(data.user_ids), CHUNK_USERS):
        rows = slice(start, start + CHUNK_USERS)
        scored = scorer(data, rows)
        if isinstance(scored, SharedScores) and scored.table is not table:
            table, ranked = scored.table, sort_table(scored.table)
        if isinstance(scored, SharedScores) and ranked is not None:
            order, best = top_unseen_shared(ranked, scored.row_of, data.history, rows, k)
        else:
            dense = scored.dense() if isinstance(scored, SharedScores) else scored
            order, best = top_unseen(dense, data.history.dense(rows), k)
        for row_order, row_best in zip(order, best):
            keep = row_order >= 0
            item_ids.append(ids[row_order[keep]].tolist())
            scores.append(row_best[keep].tolist())
    return item_ids, scores


def validation_score(scorer: Scorer, data: SplitData, items: Sequence[str], metric: str) -> float:
    """`metric` (e.g. `ndcg@10`) of the scorer on a split's users with targets."""
    _, _, cutoff = metric.partition("@")
    k = int(cutoff) if cutoff.isdigit() else 100
    ranked, _ = rankings(scorer, data, items, k)
    by_user = dict(zip(data.user_ids, ranked))
    result = score_rankings(by_user, data.truth, [k], len(items))
    if metric not in result:
        raise BaselineError(f"selection_metric {metric!r} is not one of {sorted(result)}")
    return result[metric]
