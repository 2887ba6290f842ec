"""Streaming scoring of one model's candidates against one split's truth.

Why a module of its own: the in-process evaluation, the 1M-user benchmark and the Beam job
(`beam_jobs/evaluate.py`) must compute the same numbers. All three turn a batch of candidate
rows into a `ModelScore` with `score_batch` and add the partial results up with `merge`; only
how batches are produced differs (Parquet row groups here, a PCollection in Beam).

Memory is bounded by the batch size and the truth table, never by the candidates: a batch of
n rows becomes an [n, K] int matrix of item indices, then [n, K] hits, then per-user metric
columns that go straight into bootstrap accumulators (`recsys_cvae.evaluation.stats`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_cvae import metrics as M
from recsys_cvae.evaluation import stats as St

# Per-segment tables carry these per-user metrics at the cut-off closest to 10, to stay small.
SEGMENT_METRICS = ("ndcg", "recall", "hitrate", "mrr", "pop_pct")
# Intra-list diversity costs O(k^2) per user, so it is computed for these cut-offs only.
ILD_MAX_K = 20


@dataclasses.dataclass
class Truth:
    """One split's held-out items, histories and segments, indexed by row.

    Attributes:
      user_ids: [n] object array of user ids (users with at least one target).
      num_relevant: [n] int64 targets per user.
      target_keys: sorted int64 `row * num_items + item` of every (user, target) pair.
      history_keys: sorted int64 `row * num_items + item` of every (user, history item) pair;
        a recommended history item is a protocol leak and is counted.
      segments: attribute -> [n] object array of segment labels ("unknown" when missing).
      hashes: [n] uint64 `stats.user_hashes(user_ids)`.
    """

    user_ids: np.ndarray
    num_relevant: np.ndarray
    target_keys: np.ndarray
    history_keys: np.ndarray
    segments: dict[str, np.ndarray]
    hashes: np.ndarray

    def __post_init__(self) -> None:
        import pandas as pd

        self.index = pd.Index(self.user_ids)

    def __len__(self) -> int:
        return len(self.user_ids)


def pair_keys(rows_of_items: Sequence[Sequence[int]], num_items: int) -> np.ndarray:
    """Sorted int64 `row * num_items + item` for a list of per-row item index lists."""
    lengths = np.array([len(r) for r in rows_of_items], dtype=np.int64)
    if not lengths.sum():
        return np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(rows_of_items), dtype=np.int64), lengths)
    items = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows_of_items if len(r)])
    return np.unique(rows * num_items + items)


@dataclasses.dataclass
class Context:
    """What scoring needs besides the truth.

    Attributes:
      ks: cut-offs.
      num_items: catalogue size.
      information: [num_items] self-information of each item in bits (novelty).
      percentile: [num_items] popularity percentile of each item.
      categories: [num_items, c] 0/1 item categories, or None without item metadata.
      replicates: bootstrap replicates B.
      seed: bootstrap seed (the same for every model, so their replicates are paired).
    """

    ks: tuple[int, ...]
    num_items: int
    information: np.ndarray
    percentile: np.ndarray
    categories: np.ndarray | None = None
    replicates: int = 200
    seed: int = 0

    @property
    def metric_names(self) -> tuple[str, ...]:
        names = [f"{m}@{k}" for k in self.ks for m in M.ACCURACY] + ["mrr"]
        names += [f"{m}@{k}" for k in self.ks for m in ("novelty", "pop_pct")]
        if self.categories is not None:
            names += [f"ild@{k}" for k in self.ks if k <= ILD_MAX_K]
        return tuple(names)

    @property
    def segment_metric_names(self) -> tuple[str, ...]:
        k = min(self.ks, key=lambda k: (abs(k - 10), k))
        return tuple(m if m == "mrr" else f"{m}@{k}" for m in SEGMENT_METRICS)


@dataclasses.dataclass
class ModelScore:
    """Partial (mergeable) results of one model on one split.

    Attributes:
      overall: accumulator over every evaluated user.
      segments: (attribute, label) -> accumulator of SEGMENT_METRICS.
      exposure: k -> [num_items] int64 top-k counts.
      seen: [num_truth_users] bool, users with a candidate row. Within a batch the first row
        of a user wins; a user repeated across batches is scored twice and counted in
        `duplicates` (the candidate writers never repeat a user).
      rows_read, duplicates, unknown_users, unknown_items, history_leaks: counters.
    """

    overall: St.MeanAccumulator
    segments: dict[tuple[str, str], St.MeanAccumulator]
    exposure: dict[int, np.ndarray]
    seen: np.ndarray
    rows_read: int = 0
    duplicates: int = 0
    unknown_users: int = 0
    unknown_items: int = 0
    history_leaks: int = 0

    @classmethod
    def empty(cls, truth: Truth, context: Context) -> ModelScore:
        return cls(
            overall=St.MeanAccumulator.empty(context.metric_names, context.replicates),
            segments={},
            exposure={k: np.zeros(context.num_items, np.int64) for k in context.ks},
            seen=np.zeros(len(truth), dtype=bool),
        )

    def merge(self, other: ModelScore) -> ModelScore:
        self.overall.merge(other.overall)
        for key, acc in other.segments.items():
            if key in self.segments:
                self.segments[key].merge(acc)
            else:
                self.segments[key] = acc
        for k in self.exposure:
            self.exposure[k] += other.exposure[k]
        self.duplicates += int((self.seen & other.seen).sum()) + other.duplicates
        self.seen |= other.seen
        for name in ("rows_read", "unknown_users", "unknown_items", "history_leaks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


def index_matrix(item_lists: pa.Array, vocabulary: pa.Array, width: int) -> np.ndarray:
    """[n, width] int64 item indices from a list<string> array, -1 for padding/unknown ids.

    vocabulary: the item vocabulary as a pyarrow string array; the lookup (pc.index_in) runs
    in Arrow, so no Python string is created per recommended item.
    """
    offsets = np.asarray(item_lists.offsets)
    counts = np.diff(offsets)
    flat = pc.list_flatten(item_lists)
    codes = pc.index_in(flat, value_set=vocabulary).fill_null(-1).to_numpy()
    out = np.full((len(counts), width), -1, dtype=np.int64)
    row_of = np.repeat(np.arange(len(counts)), counts)
    position = np.arange(len(flat)) - np.repeat(offsets[:-1] - offsets[0], counts)
    keep = position < width
    out[row_of[keep], position[keep]] = codes[keep]
    return out


def per_user_values(item_matrix: np.ndarray, rows: np.ndarray, truth: Truth, context: Context):
    """[n, m] per-user metrics (columns = context.metric_names) and the number of history
    items recommended, for users at truth rows `rows`."""
    hits = M.hits_from_index(item_matrix, rows, truth.target_keys, context.num_items)
    columns = M.accuracy_metrics(hits, truth.num_relevant[rows], context.ks)
    novelty = M.mean_item_values(item_matrix, context.information, context.ks)
    popularity = M.mean_item_values(item_matrix, context.percentile, context.ks)
    for k in context.ks:
        columns[f"novelty@{k}"] = novelty[k]
        columns[f"pop_pct@{k}"] = popularity[k]
        if context.categories is not None and k <= ILD_MAX_K:
            columns[f"ild@{k}"] = M.intra_list_diversity(item_matrix, context.categories, k)
    values = np.stack([columns[name] for name in context.metric_names], axis=1)
    leaks = M.hits_from_index(item_matrix, rows, truth.history_keys, context.num_items).sum()
    return values, int(leaks)


def score_values(
    values: np.ndarray, rows: np.ndarray, truth: Truth, context: Context, score: ModelScore
) -> None:
    """Adds per-user values [n, m] of truth rows `rows` to the overall and segment sums."""
    weights = St.poisson_weights(truth.hashes[rows], context.replicates, context.seed)
    score.overall.add(values, weights)
    segment_columns = [context.metric_names.index(n) for n in context.segment_metric_names]
    for attribute, labels in truth.segments.items():
        row_labels = labels[rows]
        for label in np.unique(row_labels):
            mask = row_labels == label
            key = (attribute, str(label))
            if key not in score.segments:
                score.segments[key] = St.MeanAccumulator.empty(
                    context.segment_metric_names, context.replicates
                )
            score.segments[key].add(values[mask][:, segment_columns], weights[:, mask])


def score_batch(
    batch: pa.RecordBatch | pa.Table, truth: Truth, context: Context, vocabulary: pa.Array
) -> ModelScore:
    """A ModelScore for one batch of candidate rows (columns user_id, item_ids).

    vocabulary: `item_vocabulary(items)`, built once per job rather than per batch."""
    score = ModelScore.empty(truth, context)
    users = np.asarray(batch.column("user_id").to_numpy(zero_copy_only=False), dtype=object)
    score.rows_read = len(users)
    rows = truth.index.get_indexer(users)
    known = rows >= 0
    score.unknown_users = int((~known).sum())
    items = batch.column("item_ids")
    if isinstance(items, pa.ChunkedArray):
        items = items.combine_chunks()
    width = max(context.ks)
    matrix = index_matrix(items, vocabulary, width)[known]
    rows = rows[known]
    # Only the first row of a user counts; later ones are duplicates.
    _, first = np.unique(rows, return_index=True)
    score.duplicates = len(rows) - len(first)
    rows, matrix = rows[first], matrix[first]
    flat_lengths = np.diff(np.asarray(items.offsets))[known][first].clip(max=width)
    score.unknown_items = int(flat_lengths.sum() - (matrix >= 0).sum())
    score.seen[rows] = True
    values, score.history_leaks = per_user_values(matrix, rows, truth, context)
    score_values(values, rows, truth, context, score)
    for k in context.ks:
        score.exposure[k] += M.exposure_counts(matrix, context.num_items, k)
    return score


def item_vocabulary(items) -> pa.Array:
    """The item vocabulary as a pyarrow string array (accepts one, or a list of ids)."""
    return items if isinstance(items, pa.Array) else pa.array(list(items), pa.string())


def finish(score: ModelScore, truth: Truth, context: Context) -> ModelScore:
    """Adds the truth users no candidate row covered, with zero on every metric (a model
    cannot gain by leaving hard users out); call once, after all batches are merged."""
    missing = np.flatnonzero(~score.seen)
    if len(missing):
        values = np.zeros((len(missing), len(context.metric_names)))
        score_values(values, missing, truth, context, score)
    return score


def summarise(score: ModelScore, context: Context) -> dict:
    """JSON-ready means, CIs, catalogue metrics, segment tables and counters."""
    means = score.overall.means()
    for k, exposure in score.exposure.items():
        means[f"coverage@{k}"] = M.coverage(exposure)
        means[f"gini@{k}"] = M.gini(exposure)
    segments: dict[str, dict[str, dict]] = {}
    for (attribute, label), acc in sorted(score.segments.items()):
        segments.setdefault(attribute, {})[label] = {
            **acc.means(),
            "users": acc.count,
            "ci": acc.intervals(),
        }
    return {
        "metrics": means,
        "ci": score.overall.intervals(),
        "segments": segments,
        "counts": {
            "users": score.overall.count,
            "users_missing": int((~score.seen).sum()),
            "rows_read": score.rows_read,
            "duplicate_rows": score.duplicates,
            "unknown_users": score.unknown_users,
            "unknown_items": score.unknown_items,
            "history_leaks": score.history_leaks,
        },
    }


def score_batches(
    batches: Iterable[pa.RecordBatch], truth: Truth, context: Context, items: Sequence[str]
) -> ModelScore:
    """Scores a stream of batches in one pass and finishes the result."""
    vocabulary = item_vocabulary(items)
    total = ModelScore.empty(truth, context)
    for batch in batches:
        total.merge(score_batch(batch, truth, context, vocabulary))
    return finish(total, truth, context)
