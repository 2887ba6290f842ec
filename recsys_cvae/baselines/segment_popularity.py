"""Segment popularity: popularity among the users who share one or two attribute values.

Why a module of its own: it is the baseline that uses attributes but no history, the fair
opponent of the CVAE's `generate` on cold users, and its segment logic (quantile bins for
numeric attributes, shrinkage to global popularity, choice of attributes on validation) is
more than the other baselines put together.

    score_i = (Σ_{u in segment} X[u, i] + m · p_i) / (|segment| + m),   p_i = global share
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from recsys_cvae import spec as S
from recsys_cvae.baselines.rankings import validation_score
from recsys_cvae.baselines.split_data import BaselineError, SplitData
from recsys_cvae.config import EvaluateConfig
from recsys_cvae.ranking import SharedScores


def segment_keys(
    train: SplitData, attribute_kinds: dict[str, str], bins: int
) -> dict[str, Callable[[Any], Any]]:
    """Attribute name -> function mapping a value to its segment key (None = unknown).

    Categorical values are their own segment; numeric values fall into `bins` bins cut at
    the training users' quantiles.
    """
    keys: dict[str, Callable[[Any], Any]] = {}
    for name, kind in attribute_kinds.items():
        if kind == S.CATEGORICAL:
            keys[name] = lambda value: value if value else None
            continue
        values = np.array([v for v in train.attributes[name] if not math.isnan(v)])
        if len(values) == 0:
            continue
        edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
        keys[name] = lambda value, edges=edges: (
            None if math.isnan(value) else int(np.searchsorted(edges, value, side="right"))
        )
    return keys


class SegmentPopularity:
    """Popularity within the users sharing the values of a few attributes, shrunk to global.

    Args:
      train: the training split.
      attributes: names of the attributes whose values form a segment (one or a pair).
      keys: from `segment_keys`.
      prior_users: m, the weight of global popularity in users.
    """

    def __init__(
        self,
        train: SplitData,
        attributes: Sequence[str],
        keys: dict[str, Callable[[Any], Any]],
        prior_users: float,
    ) -> None:
        self.attributes = tuple(attributes)
        self._keys = keys
        self._global = train.history.item_counts() / max(len(train.user_ids), 1)
        prior = prior_users * self._global
        sums: dict[tuple, np.ndarray] = {}
        sizes: dict[tuple, int] = {}
        for u, key in enumerate(self.segment_of(train, range(len(train.user_ids)))):
            if key is None:
                continue
            sums.setdefault(key, np.zeros(train.history.num_items))
            sums[key][train.history.row(u)] += 1.0  # a user's items are distinct
            sizes[key] = sizes.get(key, 0) + 1
        # One table for every chunk (`SharedScores`, sorted once per split): row 0 = global.
        self._row = {key: row for row, key in enumerate(sums, start=1)}
        self._table = np.stack(
            [self._global] + [(sums[key] + prior) / (sizes[key] + prior_users) for key in sums]
        )

    def segment_of(self, data: SplitData, rows: Sequence[int]) -> list[tuple | None]:
        """The segment key of each user in rows; None when any of its values is unknown."""
        keys = []
        for u in rows:
            key = tuple(self._keys[a](data.attributes[a][u]) for a in self.attributes)
            keys.append(None if None in key else key)
        return keys

    def scores(self, data: SplitData, rows: slice) -> SharedScores:
        """[len(rows), num_items] as `SharedScores`: the segment's scores; global shares for
        unknown segments (and segments no training user is in)."""
        keys = self.segment_of(data, range(len(data.user_ids))[rows])
        row_of = np.fromiter((self._row.get(key, 0) for key in keys), np.int64, len(keys))
        return SharedScores(self._table, row_of)


def select_segments(
    spec: S.FeatureSpec,
    train: SplitData,
    validation: SplitData | None,
    items: Sequence[str],
    config: EvaluateConfig,
) -> tuple[SegmentPopularity, dict[str, Any]]:
    """Tries every attribute and every pair of attributes as the segment; keeps the best
    (on a tie, the one tried first: single attributes before pairs)."""
    kinds = {a.name: a.kind for a in spec.attributes}
    keys = segment_keys(train, kinds, config.numeric_bins)
    if not keys:
        raise BaselineError("segment_popularity needs at least one user attribute")
    names = sorted(keys)
    options = [(n,) for n in names] + list(itertools.combinations(names, 2))
    if validation is None:
        model = SegmentPopularity(train, options[0], keys, config.segment_prior_users)
        return model, {"attributes": list(options[0]), "tried": {}}
    tried: dict[str, float] = {}
    best: tuple[float, SegmentPopularity] | None = None
    for option in options:
        model = SegmentPopularity(train, option, keys, config.segment_prior_users)
        value = validation_score(model.scores, validation, items, config.selection_metric)
        tried["+".join(option)] = value
        if best is None or value > best[0]:
            best = (value, model)
    return best[1], {
        "attributes": list(best[1].attributes),
        "selection_metric": config.selection_metric,
        "tried": tried,
    }
