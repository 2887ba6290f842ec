"""Evaluation protocols as splits: which user record goes where, decided by seeded hashes.

Why hashes: a split must not depend on row order, bundle boundaries or the runner, so every
decision is a function of (seed, protocol, user id[, item id]) alone. Users hash with SHA-256
(`unit_hash`); (user, item) pairs with a SplitMix64 mix of a per-user SHA-256 and pandas'
fixed-key SipHash of the item, vectorised over whole buckets.

Protocols (`features.protocols`; each is {role: split} in the spec):

    strong    train / validation / test: held-out users; an evaluation user's items are split
              into fold-in (history) and targets, as in Mult-VAE
    cold      cold: users held out entirely; history empty, every item a target
    weak      weak_train: every warm user with their training part; weak_validation /
              weak_test: the same users, history = their other items, targets = a held-out
              part (per-item hash below target_fraction -> test, below 2x -> validation)
    temporal  temporal_train: every warm user's items before the cut; temporal_validation /
              temporal_test: users with items on both sides of the cut, history before,
              targets at or after (users hashed into validation or test)

A warm user has at least `min_user_interactions` items (after filtering); lighter users are in
`cold` only.

`assign_split` and `hold_out` state the rules for one user; `hold_out_events` applies them to
a whole bucket of events at once, and `bucket_records` turns its decisions into records.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from recsys_cvae import spec as S
from recsys_cvae.config import FeaturesConfig

ALL_PROTOCOLS = (S.STRONG, S.WEAK, S.TEMPORAL, S.COLD_START)
PROTOCOL_SPLITS = {
    S.STRONG: {"train": S.TRAIN, "validation": S.VALIDATION, "test": S.TEST},
    S.COLD_START: {"test": S.COLD},
    S.WEAK: {"train": "weak_train", "validation": "weak_validation", "test": "weak_test"},
    S.TEMPORAL: {
        "train": "temporal_train", "validation": "temporal_validation", "test": "temporal_test"
    },
}  # fmt: skip
_MASK64 = (1 << 64) - 1


class UserExample(NamedTuple):
    """One output record: which split, and what the model sees and must predict."""

    split: str
    user_id: str
    history: list[str]
    targets: list[str]
    attributes: dict[str, Any]
    history_weights: list[float] | None = None  # with features.recency_half_life_days


def splits_of(protocols: list[str]) -> list[str]:
    """Split names written for `protocols`, in a stable order."""
    return [s for p in ALL_PROTOCOLS if p in protocols for s in PROTOCOL_SPLITS[p].values()]


def primary_protocol(protocols: list[str]) -> str:
    """The spec's primary protocol: strong when written (training defaults to it)."""
    return S.STRONG if S.STRONG in protocols else protocols[0]


def unit_hash(*parts: Any) -> float:
    """A number in [0, 1) from the parts; the same on every machine and Python process."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _hash64(*parts: Any) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit moves every output bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pair_unit(user_hash: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """[n] uint64 user hashes and [n] item ids -> [n] floats in [0, 1)."""
    return _pair_unit(user_hash, _mix64(pd.util.hash_array(np.asarray(item_ids, dtype=object))))


def _pair_unit(user_hash: np.ndarray, mixed_item_hash: np.ndarray) -> np.ndarray:
    mixed = _mix64(np.asarray(user_hash, dtype=np.uint64) ^ mixed_item_hash)
    return (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53


def assign_split(user_id: str, num_items: int, config: FeaturesConfig) -> str:
    """The strong-generalisation split of a user with `num_items` distinct kept items.

    Users below `min_user_interactions` items (including none) are `cold`: too little history
    to train on or fold in, like new sign-ups. An evaluation user needs one fold-in and one
    target item, so with fewer than 2 -> train.
    """
    if num_items == 0 or num_items < config.min_user_interactions:
        return S.COLD
    bucket = unit_hash(config.seed, user_id)
    edges = (
        (config.validation_fraction, S.VALIDATION),
        (config.validation_fraction + config.test_fraction, S.TEST),
        (config.validation_fraction + config.test_fraction + config.cold_fraction, S.COLD),
    )
    split = next((name for edge, name in edges if bucket < edge), S.TRAIN)
    if split in (S.VALIDATION, S.TEST) and num_items < 2:
        return S.TRAIN
    return split


def _target_mask(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Items hashing below `fraction` are targets; at least one target and one fold-in item."""
    mask = hashes < fraction
    if not mask.any():
        mask[np.argmin(hashes)] = True
    if mask.all():
        mask[np.argmax(hashes)] = False
    return mask


def hold_out(
    user_id: str, item_ids: list[str], config: FeaturesConfig
) -> tuple[list[str], list[str]]:
    """Splits an evaluation user's items into (fold-in history, targets), order preserved.

    Item i is a target when its (seed, user, item) hash < target_fraction, so the choice does
    not depend on the other items; with no target the smallest hash becomes one, with no
    fold-in item the largest returns.
    """
    items = np.asarray(item_ids, dtype=object)
    user_hash = np.full(len(items), _hash64(config.seed, S.STRONG, user_id), np.uint64)
    hashes = pair_unit(user_hash, items)
    mask = _target_mask(hashes, config.target_fraction)
    return items[~mask].tolist(), items[mask].tolist()


class BucketEvents(NamedTuple):
    """One bucket's deduplicated events, sorted by (user, timestamp, item).

    Attributes:
      users: [U] user ids (profile-only users included); `user` indexes it.
      items: [I] distinct item ids, sorted; `item_code` indexes it (compact to pickle).
      user: [n] int32; item_code: [n] int32; rating, timestamp: [n] float (NaN = none);
      events: [n] raw log rows merged into each event; positive: [n] bool (passes min_rating).
      profiles: user id -> attributes (absent = not in the users table).
    """

    users: np.ndarray
    items: np.ndarray
    user: np.ndarray
    item_code: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    events: np.ndarray
    positive: np.ndarray
    profiles: dict[str, dict[str, str]]

    @property
    def item(self) -> np.ndarray:
        """[n] object item ids."""
        return self.items[self.item_code]

    def item_mask(self, keep: frozenset) -> np.ndarray:
        """[n] bool: the event's item is in `keep`."""
        return pd.Series(self.items).isin(keep).to_numpy()[self.item_code]


class HeldOut(NamedTuple):
    """Which of a bucket's events each protocol holds out, decided for all its users at once:
    a record's context features may only see its history's events (`bucket_records`), so
    these masks are needed before any record is built.

    Attributes ([n] per event, [U] per user):
      eligible: [n] positive events of kept items, the only events a record holds.
      bounds: [U + 1] offsets; user code c's events are rows bounds[c]:bounds[c + 1].
      strong_split: [U] (`assign_split`); strong_target: [n] strong evaluation targets.
      weak_test, weak_validation: [n]; before: [n] before the temporal cut (all, without one).
    """

    eligible: np.ndarray
    bounds: np.ndarray
    strong_split: list[str]
    strong_target: np.ndarray
    weak_test: np.ndarray
    weak_validation: np.ndarray
    before: np.ndarray

    def rows(self, code: int) -> np.ndarray:
        """User `code`'s eligible events: the bucket is sorted by user, so they are one range."""
        start, end = self.bounds[code], self.bounds[code + 1]
        return np.flatnonzero(self.eligible[start:end]) + start


def _event_hashes(bucket: BucketEvents, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n] strong and [n] weak (user, item) hashes in [0, 1), as `pair_unit` computes them.

    Why per protocol: strong and weak hold out different items of a user, so each seeds its
    own user hash. Why this shape: one SHA-256 per user and one SipHash per distinct item,
    mixed per event in numpy, instead of a SHA-256 per event.
    """
    users_hash = {
        p: np.array([_hash64(seed, p, u) for u in bucket.users], dtype=np.uint64)
        for p in (S.STRONG, S.WEAK)
    }
    item_hash = _mix64(pd.util.hash_array(bucket.items.astype(object)))[bucket.item_code]
    strong = _pair_unit(users_hash[S.STRONG][bucket.user], item_hash)
    weak = _pair_unit(users_hash[S.WEAK][bucket.user], item_hash)
    return strong, weak


def hold_out_events(
    bucket: BucketEvents, vocabulary: frozenset, config: FeaturesConfig, time: dict[str, float]
) -> HeldOut:
    """Every protocol's held-out events of the bucket (`HeldOut`): the rules above, per event.

    Strong validation and test users get `hold_out`'s targets (`_target_mask`); a weak user
    whose every item hashed into validation or test gets its largest-hash item back, so
    `weak_train` is never empty. Both protocols share one Python loop over the users, as each
    needs the user's event range.
    """
    fraction = config.target_fraction
    n_users = len(bucket.users)
    eligible = bucket.positive & bucket.item_mask(vocabulary)
    strong_h, weak_h = _event_hashes(bucket, config.seed)
    counts = np.bincount(bucket.user[eligible], minlength=n_users)
    strong_split = [assign_split(u, int(n), config) for u, n in zip(bucket.users, counts)]
    held = HeldOut(
        eligible=eligible,
        bounds=np.searchsorted(bucket.user, np.arange(n_users + 1)),
        strong_split=strong_split,
        strong_target=np.zeros(len(bucket.user), bool),
        weak_test=eligible & (weak_h < fraction),
        weak_validation=eligible & (weak_h >= fraction) & (weak_h < 2 * fraction),
        before=bucket.timestamp < time.get("cut", np.inf),
    )
    for code, split in enumerate(strong_split):  # fills the masks above in place
        rows = held.rows(code)
        if split in (S.VALIDATION, S.TEST):
            held.strong_target[rows] = _target_mask(strong_h[rows], fraction)
        weak = held.weak_test[rows] | held.weak_validation[rows]
        if len(rows) and weak.all():  # keep one training item: the largest hash returns
            back = rows[np.argmax(weak_h[rows])]
            held.weak_test[back] = held.weak_validation[back] = False
    return held
