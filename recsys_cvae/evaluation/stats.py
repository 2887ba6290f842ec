"""Means with bootstrap confidence intervals that can be computed in one streaming pass.

Why a Poisson bootstrap keyed by user id: the classic bootstrap resamples the whole user list,
which needs every per-user value in memory at once. Giving each user a Poisson(1) weight per
replicate instead (Hanley & MacGibbon, 2006; Chamandy et al., 2012) makes every replicate a
weighted sum that adds up batch by batch and merges across Beam workers. The weights are a
hash of (user id, replicate, seed), so a user gets the same weights in every batch order, on
every worker and for every model: replicates of two models are paired, and the difference of
their replicate means is a paired bootstrap of the difference.

    values   [n, m]  per-user metrics (m metric names)
    weights  [B, n]  Poisson(1) weight of each user in each of B replicates
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# P(Poisson(1) <= j) for j = 0..9; beyond 9 has probability < 1e-7 and is folded into 9.
_POISSON_CDF = np.cumsum([math.exp(-1) / math.factorial(j) for j in range(10)])
# The same as 32-bit thresholds: weight = how many thresholds a uniform uint32 exceeds.
_POISSON_THRESHOLDS = (_POISSON_CDF[:-1] * 2.0**32).astype(np.uint32)


def user_hashes(user_ids: Sequence[str]) -> np.ndarray:
    """[n] uint64, a stable hash of each user id (the same in every process and machine)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(user_ids, dtype=object), categorize=False)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def poisson_weights(hashes: np.ndarray, replicates: int, seed: int = 0) -> np.ndarray:
    """[replicates, n] float32 Poisson(1) weights, a pure function of (hash, replicate, seed)."""
    with np.errstate(over="ignore"):
        base = hashes.astype(np.uint64) ^ _splitmix64(np.uint64(seed) + np.zeros(1, np.uint64))
        salts = _splitmix64(np.arange(1, replicates + 1, dtype=np.uint64) * _GOLDEN)
        mixed = _splitmix64(base[None, :] ^ salts[:, None])
    top32 = (mixed >> np.uint64(32)).astype(np.uint32)
    weights = np.zeros(top32.shape, dtype=np.float32)
    for threshold in _POISSON_THRESHOLDS:
        weights += top32 > threshold
    return weights


@dataclasses.dataclass
class MeanAccumulator:
    """Sums for the mean of m metrics and of B bootstrap replicates of it; add and merge.

    Attributes:
      names: the m metric names, in column order.
      count: users added.
      sums: [m] sums of the per-user values.
      boot_sums: [B, m] weighted sums per replicate.
      boot_counts: [B] sum of weights per replicate.
    """

    names: tuple[str, ...]
    count: int
    sums: np.ndarray
    boot_sums: np.ndarray
    boot_counts: np.ndarray

    @classmethod
    def empty(cls, names: Sequence[str], replicates: int) -> MeanAccumulator:
        m = len(names)
        return cls(
            tuple(names), 0, np.zeros(m), np.zeros((replicates, m)), np.zeros(replicates)
        )

    def add(self, values: np.ndarray, weights: np.ndarray) -> None:
        """values [n, m]; weights [B, n] from `poisson_weights` for the same n users."""
        if not len(values):
            return
        self.count += len(values)
        self.sums += values.sum(axis=0)
        self.boot_sums += weights.astype(np.float64) @ values
        self.boot_counts += weights.sum(axis=1)

    def merge(self, other: MeanAccumulator) -> MeanAccumulator:
        if other.names != self.names:
            raise ValueError(f"cannot merge metrics {other.names} into {self.names}")
        self.count += other.count
        self.sums += other.sums
        self.boot_sums += other.boot_sums
        self.boot_counts += other.boot_counts
        return self

    def means(self) -> dict[str, float]:
        if not self.count:
            return {name: 0.0 for name in self.names}
        return dict(zip(self.names, (self.sums / self.count).tolist()))

    def replicate_means(self) -> np.ndarray:
        """[B, m] mean of each replicate (replicates with zero total weight are dropped)."""
        keep = self.boot_counts > 0
        return self.boot_sums[keep] / self.boot_counts[keep, None]

    def intervals(self, level: float = 0.95) -> dict[str, list[float]]:
        """name -> [low, high], the percentile bootstrap interval at `level`."""
        replicates = self.replicate_means()
        if len(replicates) < 2:
            return {name: [math.nan, math.nan] for name in self.names}
        tail = 100 * (1 - level) / 2
        low, high = np.percentile(replicates, [tail, 100 - tail], axis=0)
        return {name: [float(lo), float(hi)] for name, lo, hi in zip(self.names, low, high)}


def paired_test(
    model: MeanAccumulator, baseline: MeanAccumulator, metric: str, level: float = 0.95
) -> dict[str, float | list[float]]:
    """Paired bootstrap test of mean(model) - mean(baseline) on the same users.

    Both accumulators must have seen the same users with weights from the same seed, which
    makes replicate b of each the same resample of users. Returns the difference, its
    interval and a two-sided p-value (twice the share of replicates on the far side of 0,
    floored at 1/B).
    """
    if model.count != baseline.count:
        raise ValueError(
            f"paired test needs the same users; got {model.count} and {baseline.count}"
        )
    column_a, column_b = model.names.index(metric), baseline.names.index(metric)
    keep = (model.boot_counts > 0) & (baseline.boot_counts > 0)
    diffs = (
        model.boot_sums[keep, column_a] / model.boot_counts[keep]
        - baseline.boot_sums[keep, column_b] / baseline.boot_counts[keep]
    )
    difference = model.means()[metric] - baseline.means()[metric]
    if len(diffs) < 2:
        return {"difference": difference, "ci": [math.nan, math.nan], "p_value": math.nan}
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    far_side = min((diffs <= 0).mean(), (diffs >= 0).mean())
    p_value = min(1.0, max(2 * far_side, 1.0 / len(diffs)))
    return {"difference": difference, "ci": [float(low), float(high)], "p_value": float(p_value)}


def summarise(accumulators: Mapping[str, MeanAccumulator]) -> dict[str, dict]:
    """key -> {"mean": {...}, "ci": {...}, "users": n} for JSON."""
    return {
        key: {"mean": acc.means(), "ci": acc.intervals(), "users": acc.count}
        for key, acc in accumulators.items()
    }
