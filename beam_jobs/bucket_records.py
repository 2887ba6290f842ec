"""One bucket's user records for every protocol: the protocols' rules (`splits`) applied to
a whole bucket of events, with context features and recency weights.

Why apart from `splits`: the rules decide which events are history and which are targets
(`splits.hold_out_events`, per event in numpy); this module turns those decisions into
`UserExample`s, which also needs the context features each record may see
(`context_features`) and the history weights (`features.recency_half_life_days`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from beam_jobs import context_features as C
from beam_jobs.splits import BucketEvents, HeldOut, UserExample, hold_out_events, unit_hash
from recsys_cvae import spec as S
from recsys_cvae.config import FeaturesConfig


class _User(NamedTuple):
    """One user of the bucket: code (index into `users`), id, eligible event rows, item ids."""

    code: int
    id: str
    rows: np.ndarray
    items: np.ndarray


def _context_tables(
    bucket: BucketEvents,
    held: HeldOut,
    protocols: list[str],
    time: dict[str, float],
    context: list[str],
) -> dict[str, np.ndarray | None]:
    """Visibility -> [U, len(context)] context features of every user (None without context).

    Why one table per visibility: a record's context features may only see its history's
    events (`context_features`), so each held-out set hides its own, and one vectorised
    `user_context` call serves all users. "temporal" sees the events before the cut, with the
    cut as "now".
    """

    def table(visible, now):
        if not context:
            return None
        return C.user_context(bucket.user, bucket.events, bucket.rating, bucket.timestamp,
                              visible, len(bucket.users), now, context)  # fmt: skip

    now = time.get("now", 0.0)
    tables = {
        "all": table(np.ones(len(bucket.user), bool), now),
        "strong_eval": table(~held.strong_target, now),
        "weak_train": table(~(held.weak_test | held.weak_validation), now),
        "weak_test": table(~held.weak_test, now),
    }
    if S.TEMPORAL in protocols:
        tables["temporal"] = table(held.before, time["cut"])
    return tables


class _UserRecords:
    """One bucket's `UserExample`s, a method per protocol.

    Why a class: every record needs the same bucket, held-out masks, context tables and
    recency weighting, set up once per bucket here; each method only says which of a user's
    events are history and which are targets. `time["cut"]` is read by `temporal` only.
    """

    def __init__(
        self,
        bucket: BucketEvents,
        config: FeaturesConfig,
        time: dict[str, float],
        context: list[str],
        held: HeldOut,
        tables: dict[str, np.ndarray | None],
    ) -> None:
        self._bucket, self._config, self._time = bucket, config, time
        self._context, self._held, self._tables = context, held, tables
        self._now = time.get("now", 0.0)
        self._half_life_s = (config.recency_half_life_days or 0.0) * C.DAY_S
        self._temporal_validation_share = config.validation_fraction / max(
            config.validation_fraction + config.test_fraction, 1e-12
        )

    def _weights(self, history_rows: np.ndarray, reference: float) -> list[float] | None:
        """0.5 ** (age / half-life) per history item (1.0 without a timestamp); or None."""
        if not self._half_life_s:
            return None
        age = reference - self._bucket.timestamp[history_rows]
        return np.where(
            np.isnan(age), 1.0, 0.5 ** (np.maximum(age, 0.0) / self._half_life_s)
        ).tolist()

    def _attributes(self, user: _User, which: str | None) -> dict[str, Any]:
        """The profile, plus the context features of visibility `which` (None: profile only)."""
        values = dict(self._bucket.profiles.get(user.id) or {})
        if self._context and which is not None:
            values.update(zip(self._context, self._tables[which][user.code].tolist()))
        return values

    def strong(self, split: str, user: _User) -> UserExample:
        """Strong train (every item as history), or validation / test (fold-in + targets)."""
        target = self._held.strong_target[user.rows]
        which = "all" if split == S.TRAIN else "strong_eval"
        return UserExample(split, user.id, user.items[~target].tolist(),
                           user.items[target].tolist(), self._attributes(user, which),
                           self._weights(user.rows[~target], self._now))  # fmt: skip

    def cold(self, user: _User) -> UserExample:
        """Cold start: no history and no context, every item a target."""
        return UserExample(S.COLD, user.id, [], user.items.tolist(), self._attributes(user, None),
                           self._weights(user.rows[:0], self._now))  # fmt: skip

    def weak(self, user: _User) -> Iterator[UserExample]:
        """A warm user's weak training part; validation (history = the training part) and
        test (history = every other item), each when it holds a target."""
        test, validation = self._held.weak_test[user.rows], self._held.weak_validation[user.rows]
        train, items, rows, now = ~(test | validation), user.items, user.rows, self._now
        yield UserExample("weak_train", user.id, items[train].tolist(), [],
                          self._attributes(user, "weak_train"),
                          self._weights(rows[train], now))  # fmt: skip
        if validation.any():
            yield UserExample("weak_validation", user.id, items[train].tolist(),
                              items[validation].tolist(), self._attributes(user, "weak_train"),
                              self._weights(rows[train], now))  # fmt: skip
        if test.any():
            yield UserExample("weak_test", user.id, items[~test].tolist(), items[test].tolist(),
                              self._attributes(user, "weak_test"),
                              self._weights(rows[~test], now))  # fmt: skip

    def temporal(self, user: _User) -> Iterator[UserExample]:
        """A warm user's items before the cut; with items on both sides, also validation or
        test (by user hash), targets at or after the cut."""
        early, items, rows = self._held.before[user.rows], user.items, user.rows
        if not early.any():
            return
        cut = self._time["cut"]
        yield UserExample("temporal_train", user.id, items[early].tolist(), [],
                          self._attributes(user, "temporal"),
                          self._weights(rows[early], cut))  # fmt: skip
        if not early.all():
            share = self._temporal_validation_share
            held = unit_hash(self._config.seed, S.TEMPORAL, user.id) < share
            yield UserExample(
                "temporal_validation" if held else "temporal_test", user.id,
                items[early].tolist(), items[~early].tolist(),
                self._attributes(user, "temporal"), self._weights(rows[early], cut),
            )  # fmt: skip


def bucket_examples(
    bucket: BucketEvents,
    vocabulary: frozenset,
    config: FeaturesConfig,
    protocols: list[str],
    time: dict[str, float],
    context: list[str],
) -> Iterator[UserExample]:
    """Every user record of one bucket for every protocol in `protocols`.

    Why in three steps: what each protocol holds out (`hold_out_events`) must be known for
    all users before the context features that may not see it (`_context_tables`); then each
    user's records are built (`_UserRecords`): strong or cold, then weak, then temporal.

    Args:
      vocabulary: the item ids kept by the filters; other items are never in a record.
      time: {"now": latest timestamp, "cut": temporal cut} (absent without timestamps).
      context: context feature names (empty: none).
    """
    held = hold_out_events(bucket, vocabulary, config, time)
    tables = _context_tables(bucket, held, protocols, time, context)
    records = _UserRecords(bucket, config, time, context, held, tables)
    for code, user_id in enumerate(bucket.users):
        rows = held.rows(code)
        if not len(rows) and user_id not in bucket.profiles:
            continue  # neither a usable item nor a profile: nothing to learn or serve
        user = _User(code, user_id, rows, bucket.items[bucket.item_code[rows]])
        split = held.strong_split[code]
        if S.STRONG in protocols and split in (S.TRAIN, S.VALIDATION, S.TEST):
            yield records.strong(split, user)
        if S.COLD_START in protocols and split == S.COLD:
            yield records.cold(user)
        if not len(rows) or len(rows) < config.min_user_interactions:
            continue  # the weak and temporal protocols hold warm users only
        if S.WEAK in protocols:
            yield from records.weak(user)
        if S.TEMPORAL in protocols:
            yield from records.temporal(user)
