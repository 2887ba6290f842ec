"""Offline evaluation: every model's candidates against the same held-out truth.

Why one module for all models: the CVAE (through Beam RunInference) and the baselines write
the same candidates format (`recsys_cvae.candidates_format`), so one streaming scorer
(`recsys_cvae.evaluation.scoring`) and the shared `recsys_cvae.metrics` functions score them all; no
model can be flattered by a metric implementation of its own.

Protocols: the feature spec's `protocols` name the split that plays the test role in each
(strong: `test`, users ranked from their fold-in history; cold: `cold`, users ranked from
attributes alone; weak/temporal: `weak_test`/`temporal_test` when the feature job wrote them).
Every test split present is scored. The truth is the users' `target_item_ids`; users without
targets are skipped; a user in the truth missing from a model's candidates scores zero on every
metric (`users_missing`), so a model cannot gain by dropping hard users. A recommended item that
is in the user's own history is a protocol leak and is counted (`history_leaks`).

Popularity (for novelty and popularity percentiles) comes from the protocol's train split.
Item categories for intra-list diversity come from item metadata when there is any
(`evaluate.items_file`, or an items file in `data_dir`: MovieLens `u.item`/`movies.dat`,
`items.csv` with a `genres`/`category` column, values separated by `|`).

Outputs, in `report_dir`:

    metrics.json  {"splits": {split: {model: {metric: mean}}},
                   "ci": {split: {model: {metric: [low, high]}}},      95% Poisson bootstrap
                   "segments": {split: {model: {attribute: {label: {metric: mean, "users"}}}}},
                   "paired": {split: {model: {"baseline", "metric", "difference", "ci",
                                              "p_value"}}},
                   "counts": {split: {model: {...}}}, "users": {split: {...}},
                   "protocols": {protocol: split}, "models": {model: label},
                   "trained_on": {model: {split: protocol}},  per-protocol models (CVAE)
                   "baselines": [...], "bootstrap": {"replicates", "seed"}}
    report.md, report.html (see `recsys_cvae.evaluation.report`)
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from recsys_cvae import candidates_format as C
from recsys_cvae import metrics as M
from recsys_cvae import protocols as P
from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.config import EvaluateConfig
from recsys_cvae.datasets.item_metadata import item_categories
from recsys_cvae.evaluation import scoring as Sc
from recsys_cvae.evaluation import stats as St
from recsys_cvae.evaluation.report import format_report, write_html

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
HTML_FILE = "report.html"
BASELINE_MARKER = "baseline.json"
# History-length buckets for the activity segment table: upper bounds, inclusive.
ACTIVITY_BUCKETS = ((0, "0"), (4, "1-4"), (19, "5-19"), (49, "20-49"), (199, "50-199"))


class EvaluationError(ValueError):
    """Inputs to the evaluation are missing or inconsistent."""


# ---- reading the truth --------------------------------------------------------------------


def load_truth(spec: S.FeatureSpec, split: str) -> tuple[dict[str, set[str]], int]:
    """({user_id: held-out item ids} for users with targets, number of users without)."""
    truth: dict[str, set[str]] = {}
    without_targets = 0
    for record in UR.read_user_records(spec, split):
        if record[S.TARGETS]:
            truth[record[S.USER_ID]] = set(record[S.TARGETS])
        else:
            without_targets += 1
    return truth, without_targets


def activity_bucket(history_length: int) -> str:
    for upper, label in ACTIVITY_BUCKETS:
        if history_length <= upper:
            return label
    return f"{ACTIVITY_BUCKETS[-1][0] + 1}+"


def numeric_labels(values: Sequence[float], bins: int) -> np.ndarray:
    """Quantile bins of a numeric attribute as readable ranges ("18-25"), "unknown" for NaN."""
    values = np.asarray(values, dtype=np.float64)
    known = values[~np.isnan(values)]
    if not len(known):
        return np.array(["unknown"] * len(values), dtype=object)
    edges = np.unique(np.quantile(known, np.linspace(0, 1, bins + 1)))
    # Edges rounded to what the spread needs (whole years for ages, 0.1 for a 0-5 score),
    # so a label reads "45-59", not "45-59.25"; bins whose edges round together merge.
    span = float(known.max() - known.min())
    digits = max(0, 1 - int(np.floor(np.log10(span)))) if span > 0 else 2
    edges = np.unique(np.round(edges, digits))
    labels = []
    for value in values:
        if np.isnan(value):
            labels.append("unknown")
            continue
        b = min(int(np.searchsorted(edges, value, side="right")) - 1, max(len(edges) - 2, 0))
        high = edges[min(b + 1, len(edges) - 1)]
        labels.append(f"{edges[b]:g}-{high:g}")
    return np.array(labels, dtype=object)


def load_truth_table(
    spec: S.FeatureSpec, split: str, item_index: Mapping[str, int], numeric_bins: int = 4
) -> tuple[Sc.Truth, int]:
    """The split as a `scoring.Truth` (users with targets) and the number of users without."""
    user_ids, targets, histories, without = [], [], [], 0
    attributes: dict[str, list] = {a.name: [] for a in spec.attributes}
    for record in UR.read_user_records(spec, split):
        wanted = [item_index[i] for i in record[S.TARGETS] if i in item_index]
        if not wanted:
            without += 1
            continue
        user_ids.append(record[S.USER_ID])
        targets.append(wanted)
        histories.append([item_index[i] for i in record[S.HISTORY] if i in item_index])
        for name in attributes:
            attributes[name].append(record[name])
    segments = {}
    for attribute in spec.attributes:
        values = attributes[attribute.name]
        segments[attribute.name] = (
            np.array([v or "unknown" for v in values], dtype=object)
            if attribute.is_categorical
            else numeric_labels(values, numeric_bins)
        )
    segments["activity"] = np.array([activity_bucket(len(h)) for h in histories], dtype=object)
    ids = np.array(user_ids, dtype=object)
    truth = Sc.Truth(
        user_ids=ids,
        num_relevant=np.array([len(t) for t in targets], dtype=np.int64),
        target_keys=Sc.pair_keys(targets, len(item_index)),
        history_keys=Sc.pair_keys(histories, len(item_index)),
        segments=segments,
        hashes=St.user_hashes(ids) if len(ids) else np.zeros(0, np.uint64),
    )
    return truth, without


def train_popularity(spec: S.FeatureSpec, split: str, item_index: Mapping[str, int]):
    """([num_items] training users per item, number of training users) of a train split."""
    counts = np.zeros(len(item_index), dtype=np.int64)
    users = 0
    for record in UR.read_user_records(spec, split):
        users += 1
        for item in set(record[S.HISTORY]) | set(record[S.TARGETS]):
            if item in item_index:
                counts[item_index[item]] += 1
    return counts, users


# ---- scoring -------------------------------------------------------------------------------


def score_files(
    paths: Sequence[str], truth: Sc.Truth, context: Sc.Context, items: Sequence[str],
    batch_rows: int = 65536,
) -> Sc.ModelScore:
    """Streams candidate shards by record batches (bounded memory) into a ModelScore."""

    def batches():
        for path in paths:
            parquet = C.open_parquet(path)
            yield from parquet.iter_batches(
                batch_size=batch_rows, columns=[C.USER_ID, C.ITEM_IDS]
            )

    return Sc.score_batches(batches(), truth, context, items)


def scoring_inputs(
    spec: S.FeatureSpec, split: str, protocol: str, config: EvaluateConfig,
    categories: np.ndarray | None = None,
) -> tuple[Sc.Truth, int, Sc.Context]:
    """(truth of `split`, users without targets, scoring context) — what every scorer (this
    module, the Beam job) needs for one split; popularity comes from the protocol's train
    split."""
    items = spec.item_vocabulary()
    item_index = {item: i for i, item in enumerate(items)}
    counts, train_users = train_popularity(spec, P.train_split(spec, protocol), item_index)
    information, percentile = M.item_popularity_stats(counts, train_users)
    context = Sc.Context(
        tuple(sorted(set(config.ks))), len(items), information, percentile, categories,
        config.bootstrap_replicates, config.seed,
    )
    truth, without = load_truth_table(spec, split, item_index, config.numeric_bins)
    return truth, without, context


def _is_baseline(candidates_dir: str, name: str) -> bool:
    import tensorflow as tf

    return tf.io.gfile.exists(posixpath.join(candidates_dir, name, BASELINE_MARKER))


def evaluate(
    features_dir: str,
    candidates_dir: str,
    report_dir: str,
    config: EvaluateConfig,
    data_dir: str = "",
    export_dir: str = "",
    training: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Scores every model folder under candidates_dir on every protocol's test split; writes
    metrics.json, report.md and report.html. A model without candidates for a split is left
    out of that split's table (named in `missing_splits`) rather than reported as zeros.

    data_dir: the raw data folder, for item metadata (config.items_file wins).
    export_dir: base path of CVAE exports, for the what-if panel (skipped when empty).
    """
    import tensorflow as tf

    spec = S.FeatureSpec.load(features_dir)
    names = C.model_names(candidates_dir)
    if not names:
        raise EvaluationError(f"{candidates_dir}: no model folders with Parquet candidates")
    items = spec.item_vocabulary()
    categories = item_categories(items, config.items_file or data_dir)
    baselines = [n for n in names if _is_baseline(candidates_dir, n)]
    sources = {name: C.read_sources(candidates_dir, name) for name in names}
    metrics: dict[str, Any] = {
        "splits": {}, "ci": {}, "segments": {}, "paired": {}, "counts": {}, "users": {},
        "protocols": {}, "models": {}, "missing_splits": {}, "baselines": baselines,
        "bootstrap": {"replicates": config.bootstrap_replicates, "seed": config.seed},
        "item_categories": 0 if categories is None else int(categories.shape[1]),
        "trained_on": {
            name: {split: source["protocol"] for split, source in by_split.items()}
            for name, by_split in sources.items() if by_split
        },
    }
    for split, protocol in P.evaluation_splits(spec, config).items():
        metrics["protocols"].setdefault(protocol, split)
        truth, without, context = scoring_inputs(spec, split, protocol, config, categories)
        metrics["users"][split] = {"evaluated": len(truth), "without_targets": without}
        scores = _score_models(candidates_dir, names, split, truth, context, items, config,
                               metrics)
        _summarise_split(metrics, split, scores, context, baselines, config.selection_metric)
    tf.io.gfile.makedirs(report_dir)
    S.write_text(posixpath.join(report_dir, METRICS_FILE), json.dumps(metrics, indent=2) + "\n")
    S.write_text(posixpath.join(report_dir, REPORT_FILE), format_report(metrics))
    write_html(metrics, posixpath.join(report_dir, HTML_FILE), spec, export_dir, data_dir,
               training)
    return metrics


def _score_models(
    candidates_dir: str, names: Sequence[str], split: str, truth: Sc.Truth,
    context: Sc.Context, items: Sequence[str], config: EvaluateConfig, metrics: dict[str, Any],
) -> dict[str, Sc.ModelScore]:
    """Every model's score on one split; models without candidates for it are recorded in
    `metrics["missing_splits"]`, each model's label ("cvae/3") in `metrics["models"]`."""
    scores: dict[str, Sc.ModelScore] = {}
    for name in names:
        paths = C.split_files(candidates_dir, name, split)
        if not paths:
            metrics["missing_splits"].setdefault(name, []).append(split)
            continue
        scores[name] = score_files(paths, truth, context, items, config.batch_rows)
        first = next(C.iter_rows(paths[:1]), None)
        metrics["models"][name] = (first[3] if first else "") or name
    return scores


def _summarise_split(
    metrics: dict[str, Any], split: str, scores: Mapping[str, Sc.ModelScore],
    context: Sc.Context, baselines: Sequence[str], metric: str,
) -> None:
    """One split's means, intervals, segments and counts per model, and each model's paired
    test against the best baseline on `metric` (the selection metric)."""
    for key in ("splits", "ci", "segments", "counts", "paired"):
        metrics[key][split] = {}
    for name, score in scores.items():
        summary = Sc.summarise(score, context)
        metrics["splits"][split][name] = {**summary["metrics"], **summary["counts"]}
        metrics["ci"][split][name] = summary["ci"]
        metrics["segments"][split][name] = summary["segments"]
        metrics["counts"][split][name] = summary["counts"]
    candidates = [b for b in baselines if b in scores]
    if candidates and metric in context.metric_names:
        best = max(candidates, key=lambda b: scores[b].overall.means()[metric])
        for name in scores:
            if name != best:
                result = St.paired_test(scores[name].overall, scores[best].overall, metric)
                metrics["paired"][split][name] = {"baseline": best, "metric": metric, **result}
