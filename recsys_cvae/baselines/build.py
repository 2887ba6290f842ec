"""Baselines the CVAE has to beat, written in the same candidates format.

Why these: `popularity` is the floor every recommender must clear; `segment_popularity`
(`baselines.segment_popularity`) uses the user attributes but no history, so it is the fair
opponent of `generate` on cold users; `item_knn` and `ease` (Steck, 2019; `baselines.linear`)
use the history but no attributes, and are strong neighbourhood/linear opponents of
`recommend` on warm users. The opt-in neural ones are a TFRS two-tower
(`baselines.two_tower`), the industry default, and Mult-VAE, the CVAE without its attributes;
Mult-VAE goes through the CVAE's own train/export/RunInference path, so the pipeline runs it
(`pipeline.multvae_run`), not this module.

The in-memory ones are fitted on the training users' histories (the same users the CVAE
trains on, held sparsely: `Histories`) and tuned on the validation split with
`evaluate.selection_metric`. Which protocol's train split fits each and which splits it
answers is `protocols.baseline_plan`'s decision, the planner the CVAE runs ask too. Items in
a user's own history are never recommended.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Sequence
from typing import Any

from recsys_cvae import candidates_format as C
from recsys_cvae import protocols as P
from recsys_cvae import spec as S
from recsys_cvae.baselines.linear import (
    ease_scorer,
    item_knn_weights,
    popularity,
    popularity_scorer,
    select_ease,
)
from recsys_cvae.baselines.rankings import rankings
from recsys_cvae.baselines.segment_popularity import select_segments
from recsys_cvae.baselines.split_data import BaselineError, Scorer, SplitData, load_split
from recsys_cvae.config import Config, EvaluateConfig

# Every name `evaluate.baselines` accepts; `multvae` is run by `pipeline.multvae_run`.
BASELINES = ("popularity", "segment_popularity", "item_knn", "ease", "two_tower", "multvae")
IN_MEMORY_BASELINES = tuple(name for name in BASELINES if name != "multvae")
# Fitted by another module (a neural model, opt-in through evaluate.baselines: slower).
NEURAL_BASELINES = ("two_tower",)
PARAMS_FILE = "baseline.json"

log = logging.getLogger(__name__)


def build_baselines(
    features_dir: str,
    candidates_dir: str,
    config: Config,
    k: int = 100,
    names: list[str] | None = None,
) -> list[str]:
    """Fits the named in-memory baselines (default `evaluate.baselines`) and writes their top `k`.

    Each is fitted once per `protocols.baseline_plan` entry: on that protocol's train split,
    tuned on its validation split, written for the splits it answers
    (`candidates_dir/<name>/<split>-00000-of-00001.parquet`). The settings chosen on
    validation go to `candidates_dir/<name>/baseline.json` (per protocol), which also marks
    the folder as a baseline for the evaluation's paired test. `multvae` is not fitted here
    (`pipeline.multvae_run`); asking for it, or for an unknown name, raises BaselineError.
    """
    settings = config.evaluate
    names = list(settings.baselines if names is None else names)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise BaselineError(f"unknown baseline(s) {unknown}; choose from {list(BASELINES)}")
    if "multvae" in names:
        raise BaselineError(
            "multvae is trained through the CVAE's own path, not in memory: run it with "
            "`recsys-cvae baselines` or `pipeline.stages.run_baselines`"
        )
    spec = S.FeatureSpec.load(features_dir)
    if "segment_popularity" in names and not spec.attributes:
        # features without a users file: nothing to segment by, and nothing is lost
        # (segment popularity would be popularity itself)
        names.remove("segment_popularity")
        log.info("segment_popularity left out: the features have no user attributes")
    items = spec.item_vocabulary()
    item_index = {item: i for i, item in enumerate(items)}
    params: dict[str, dict[str, Any]] = {name: {} for name in names}
    for fit in P.baseline_plan(spec, config):
        train = load_split(spec, fit.train, item_index)
        if not train.user_ids:
            raise BaselineError(f"{spec.split_pattern(fit.train)}: no training users to fit on")
        validation = load_split(spec, fit.validation, item_index) if fit.validation else None
        if validation is not None and not validation.truth:
            validation = None
        data = {split: load_split(spec, split, item_index) for split in fit.splits}
        for name in names:
            scorer, params[name][fit.protocol] = fit_baseline(
                name, spec, train, validation, items, settings
            )
            for split, users in data.items():
                ranked, scores = rankings(scorer, users, items, k)
                C.write_split(
                    candidates_dir, name, split, C.to_table(users.user_ids, ranked, scores, name)
                )
    for name in names:
        S.write_text(
            posixpath.join(candidates_dir, name, PARAMS_FILE),
            json.dumps(params[name], indent=2) + "\n",
        )
    return names


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
        # Deferred: TensorFlow Recommenders (and a TF model) load only when two_tower is asked.
        from recsys_cvae.baselines.two_tower import two_tower_scorer

        return two_tower_scorer(spec, train, validation, items, config)
    return select_ease(train, validation, items, config)
