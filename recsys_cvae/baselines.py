"""Baselines the CVAE has to beat, written in the same candidates format.

Why these: `popularity` is the floor every recommender must clear; `segment_popularity`
(`recsys_cvae.segment_popularity`) uses the user attributes but no history, so it is the fair
opponent of `generate` on cold users; `item_knn` and `ease` (Steck, 2019) use the history but no
attributes, and are strong neighbourhood/linear opponents of `recommend` on warm users. The
opt-in neural ones, a TFRS two-tower (`recsys_cvae.two_tower`) and Mult-VAE
(`recsys_cvae.multvae`), are the industry default and the CVAE without its attributes.

The numpy ones are fitted in memory on the training users' histories (the same users the CVAE
trains on, held sparsely: `Histories`) and tuned on the validation split with
`config.selection_metric`:

    X        [num_train_users, num_items] 0/1 training histories
    popularity   score_i = Σ_u X[u, i]
    item_knn     S = cosine(X[:, i], X[:, j]), zero diagonal, top `knn_neighbours` per item;
                 scores = x_user · S
    ease     B = I - P · diagMat(1 / diag(P)),  P = (XᵀX + λI)⁻¹,  scores = x_user · B

Items in a user's own history are never recommended. ItemKNN and EASE need a history, so users
whose history is empty (all cold users) get popularity from them.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S
from recsys_cvae.config import Config, EvaluateConfig
from recsys_cvae.evaluation import score_rankings
from recsys_cvae.histories import Histories
from recsys_cvae.ranking import (  # noqa: F401  (top_k: re-exported)
    SharedScores,
    sort_table,
    top_k,
    top_k_shared,
)
from recsys_cvae.segment_popularity import select_segments

BASELINES = ("popularity", "segment_popularity", "item_knn", "ease", "two_tower", "multvae")
# Fitted by another module (a neural model, opt-in through evaluate.baselines: slower).
NEURAL_BASELINES = ("two_tower",)
PARAMS_FILE = "baseline.json"
_CHUNK_USERS = 1024


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
    for record in S.read_user_records(spec, split):
        user_ids.append(record[S.USER_ID])
        known = [item_index[i] for i in record[S.HISTORY] if i in item_index]
        rows.append(np.unique(np.array(known, dtype=np.int32)))
        if record[S.TARGETS]:
            truth[record[S.USER_ID]] = set(record[S.TARGETS])
        for name in attributes:
            attributes[name].append(record[name])
    return SplitData(user_ids, Histories.from_rows(rows, len(item_index)), truth, attributes)


def _histories(history: Histories | np.ndarray) -> Histories:
    """Accepts a dense [num_users, num_items] 0/1 matrix too (small cases, tests)."""
    return history if isinstance(history, Histories) else Histories.from_dense(history)


# ---- ranking ------------------------------------------------------------------------------------


def rankings(
    scorer: Scorer, data: SplitData, items: Sequence[str], k: int
) -> tuple[list[list[str]], list[list[float]]]:
    """Item id lists and scores for every user of `data`, scored `_CHUNK_USERS` at a time."""
    item_ids: list[list[str]] = []
    scores: list[list[float]] = []
    ids = np.empty(len(items), dtype=object)
    ids[:] = list(items)
    table, ranked = None, None  # the last shared table and `sort_table` of it
    for start in range(0, len(data.user_ids), _CHUNK_USERS):
        rows = slice(start, start + _CHUNK_USERS)
        scored = scorer(data, rows)
        if isinstance(scored, SharedScores) and scored.table is not table:
            table, ranked = scored.table, sort_table(scored.table)
        if isinstance(scored, SharedScores) and ranked is not None:
            order, best = top_k_shared(ranked, scored.row_of, data.history, rows, k)
        else:
            dense = scored.dense() if isinstance(scored, SharedScores) else scored
            order, best = top_k(dense, data.history.dense(rows), k)
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


# ---- models --------------------------------------------------------------------------------------


def popularity(train_history: Histories | np.ndarray) -> np.ndarray:
    """[num_items] interaction counts over the training users."""
    return _histories(train_history).item_counts()


def popularity_scorer(global_scores: np.ndarray) -> Scorer:
    """Everyone gets the global counts [num_items]."""

    table = np.asarray(global_scores)[None, :]  # one object for every chunk: sorted once

    def score(data: SplitData, rows: slice) -> SharedScores:
        num_rows = len(range(data.history.shape[0])[rows])
        return SharedScores(table, np.zeros(num_rows, dtype=np.int64))

    return score


def ease_scorer(weights: np.ndarray, global_scores: np.ndarray) -> Scorer:
    """x_user · B [num_items, num_items]; popularity for users with an empty history."""

    def score(data: SplitData, rows: slice) -> np.ndarray:
        scores = data.history.dense(rows, np.float64) @ weights
        scores[data.history.lengths(rows) == 0] = global_scores
        return scores

    return score


def item_knn_weights(train_history: Histories | np.ndarray, neighbours: int) -> np.ndarray:
    """ItemKNN: cosine similarity between item columns of X [num_items, num_items], zero
    diagonal, keeping the `neighbours` largest per item (0 keeps all)."""
    history = _histories(train_history)
    norms = np.sqrt(history.item_counts())
    similarity = history.gram()
    similarity /= np.outer(norms, norms).clip(min=1e-12)
    similarity[np.diag_indices_from(similarity)] = 0.0
    if 0 < neighbours < similarity.shape[0]:
        cut = np.partition(similarity, -neighbours, axis=0)[-neighbours]
        similarity[similarity < cut[None, :]] = 0.0
    return similarity


def ease_weights(train_history: Histories | np.ndarray, l2: float) -> np.ndarray:
    """EASE's item-item matrix B [num_items, num_items] with a zero diagonal (closed form)."""
    return ease_from_gram(_histories(train_history).gram(), l2)


def ease_from_gram(gram: np.ndarray, l2: float) -> np.ndarray:
    """EASE's B from the Gram matrix XᵀX (float64, not modified): B = I − P·diagMat(1/diag(P)),
    P = (XᵀX + λI)⁻¹, zero diagonal. Shared with the CVAE's item-item blend."""
    regularised = gram.copy()
    regularised[np.diag_indices_from(regularised)] += l2
    inverse = np.linalg.inv(regularised)
    weights = inverse / (-np.diag(inverse))
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


# ---- building candidates -------------------------------------------------------------------------


def build_baselines(
    features_dir: str,
    candidates_dir: str,
    config: EvaluateConfig,
    top_k: int = 100,
    names: list[str] | None = None,
    full_config: Config | None = None,
) -> list[str]:
    """Fits the named baselines (default `config.baselines`) and writes their candidates.

    Each protocol in the feature spec is fitted on its own train split, tuned on its own
    validation split and written for its test split (strong: also `cold` and any other
    config.splits): `candidates_dir/<name>/<split>-00000-of-00001.parquet`. The settings
    chosen on validation go to `candidates_dir/<name>/baseline.json` (per protocol), which
    also marks the folder as a baseline for the evaluation's paired test. `multvae` trains
    the CVAE without conditioning through train/export/RunInference (`recsys_cvae.multvae`),
    one model per protocol that gets a CVAE (`train.protocols`), with `full_config`'s model
    and training settings (defaults when None).
    """
    names = list(config.baselines if names is None else names)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise BaselineError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    if "multvae" in names:
        from recsys_cvae.multvae import build_multvae

        names.remove("multvae")
        # One Mult-VAE per protocol that gets a CVAE, on the same splits as the CVAE.
        full = dataclasses.replace(full_config or Config(), evaluate=config)
        build_multvae(features_dir, candidates_dir, full)
        return build_baselines(features_dir, candidates_dir, config, top_k, names) + ["multvae"]
    spec = S.FeatureSpec.load(features_dir)
    items = spec.item_vocabulary()
    item_index = {item: i for i, item in enumerate(items)}
    params: dict[str, dict[str, Any]] = {name: {} for name in names}
    for protocol, (train_split, validation_split, splits) in protocol_plan(spec, config).items():
        train = load_split(spec, train_split, item_index)
        if not train.user_ids:
            raise BaselineError(f"{spec.split_pattern(train_split)}: no training users to fit on")
        validation = load_split(spec, validation_split, item_index) if validation_split else None
        if validation is not None and not validation.truth:
            validation = None
        data = {split: load_split(spec, split, item_index) for split in splits}
        for name in names:
            scorer, params[name][protocol] = fit_baseline(
                name, spec, train, validation, items, config
            )
            for split, users in data.items():
                ranked, scores = rankings(scorer, users, items, top_k)
                C.write_split(
                    candidates_dir, name, split, C.to_table(users.user_ids, ranked, scores, name)
                )
    for name in names:
        S.write_text(
            posixpath.join(candidates_dir, name, PARAMS_FILE),
            json.dumps(params[name], indent=2) + "\n",
        )
    return names


def protocol_plan(
    spec: S.FeatureSpec, config: EvaluateConfig
) -> dict[str, tuple[str, str | None, list[str]]]:
    """protocol -> (train split, validation split or None, splits to write candidates for).

    Protocols without a train role (cold start) use the primary protocol's models; splits in
    config.splits that no protocol tests go with the primary protocol too.
    """
    primary = spec.protocol
    plan: dict[str, tuple[str, str | None, list[str]]] = {}
    for protocol, roles in spec.protocols.items():
        test = roles.get("test")
        if not test or test not in spec.splits:
            continue
        owner = protocol if "train" in roles else primary
        owner_roles = spec.protocols[owner]
        validation = owner_roles.get("validation")
        entry = plan.setdefault(
            owner,
            (
                owner_roles["train"],
                validation if validation in spec.splits else None,
                [],
            ),
        )
        entry[2].append(test)
    tested = {split for _, _, splits in plan.values() for split in splits}
    extra = [s for s in config.splits if s in spec.splits and s not in tested]
    if extra:
        roles = spec.protocols[primary]
        validation = roles.get("validation")
        plan.setdefault(
            primary,
            (roles["train"], validation if validation in spec.splits else None, []),
        )[2].extend(extra)
    return plan


def fit_baseline(
    name: str,
    spec: S.FeatureSpec,
    train: SplitData,
    validation: SplitData | None,
    items: Sequence[str],
    config: EvaluateConfig,
) -> tuple[Scorer, dict[str, Any]]:
    """(scorer, settings chosen) of one named baseline fitted on `train`."""
    if name == "popularity":
        return popularity_scorer(popularity(train.history)), {}
    if name == "segment_popularity":
        model, params = select_segments(spec, train, validation, items, config)
        return model.scores, params
    if name == "item_knn":
        weights = item_knn_weights(train.history, config.knn_neighbours)
        scorer = ease_scorer(weights, popularity(train.history))
        return scorer, {"neighbours": config.knn_neighbours, "similarity": "cosine"}
    if name in NEURAL_BASELINES:
        from recsys_cvae.two_tower import two_tower_scorer

        return two_tower_scorer(spec, train, validation, items, config)
    return _select_ease(train, validation, items, config)


def _select_ease(
    train: SplitData, validation: SplitData | None, items: Sequence[str], config: EvaluateConfig
) -> tuple[Scorer, dict[str, Any]]:
    """Fits EASE for every λ in config.ease_lambdas; keeps the best on validation (on a tie,
    the first λ)."""
    lambdas = list(config.ease_lambdas)
    if not lambdas:
        raise BaselineError("evaluate.ease_lambdas is empty; give at least one λ")
    global_scores = popularity(train.history)
    gram = train.history.gram()  # once for every λ
    if validation is None:
        weights = ease_from_gram(gram, lambdas[0])
        return ease_scorer(weights, global_scores), {"l2": lambdas[0], "tried": {}}
    tried: dict[str, float] = {}
    best: tuple[float, float, Scorer] | None = None
    for l2 in lambdas:
        scorer = ease_scorer(ease_from_gram(gram, l2), global_scores)
        value = validation_score(scorer, validation, items, config.selection_metric)
        tried[str(l2)] = value
        if best is None or value > best[0]:
            best = (value, l2, scorer)
    return best[2], {"l2": best[1], "selection_metric": config.selection_metric, "tried": tried}
