"""A split as the in-memory baselines see it: sparse histories, held-out targets, attributes.

Why a module of its own: every baseline (and its tuning on validation) reads the same
matrices; loading them once per split and passing `SplitData` around keeps the models free of
file formats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.histories import Histories
from recsys_cvae.ranking import SharedScores

# scorer(data, rows) -> [len(rows), num_items] scores for those users of a split, dense or
# as `SharedScores`.
Scorer = Callable[["SplitData", slice], "np.ndarray | SharedScores"]


class BaselineError(ValueError):
    """A baseline cannot be fitted or was asked for by an unknown name."""


@dataclasses.dataclass
class SplitData:
    """One split as matrices.

    Attributes:
      user_ids: [num_users] in file order.
      history: [num_users, num_items] sparse (`Histories`): the items each user has; items
        outside the vocabulary are dropped and a repeated item counts once.
      truth: user id -> held-out item ids, for users that have any.
      attributes: attribute name -> [num_users] values ("" or NaN = unknown).
    """

    user_ids: list[str]
    history: Histories
    truth: dict[str, set[str]]
    attributes: dict[str, list[Any]]


def load_split(spec: S.FeatureSpec, split: str, item_index: dict[str, int]) -> SplitData:
    user_ids: list[str] = []
    rows: list[np.ndarray] = []
    truth: dict[str, set[str]] = {}
    attributes: dict[str, list[Any]] = {name: [] for name in spec.attribute_names}
    for record in UR.read_user_records(spec, split):
        user_ids.append(record[S.USER_ID])
        known = [item_index[i] for i in record[S.HISTORY] if i in item_index]
        rows.append(np.unique(np.array(known, dtype=np.int32)))
        if record[S.TARGETS]:
            truth[record[S.USER_ID]] = set(record[S.TARGETS])
        for name in attributes:
            attributes[name].append(record[name])
    return SplitData(user_ids, Histories.from_rows(rows, len(item_index)), truth, attributes)


def as_histories(history: Histories | np.ndarray) -> Histories:
    """Accepts a dense [num_users, num_items] 0/1 matrix too (small cases, tests)."""
    return history if isinstance(history, Histories) else Histories.from_dense(history)
