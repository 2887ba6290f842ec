"""Mult-VAE (Liang et al., 2018): the CVAE with its conditioning switched off, as a baseline.

Why through the whole CVAE path: Mult-VAE is exactly our model with `use_condition=False`
and the standard-normal prior, so the fair comparison trains it with the same `train`, exports
it with the same `export_model` and writes candidates with the same Beam RunInference job.
Any difference in the report is then the attributes' contribution, not an implementation's.

    W/model_multvae/, W/export_multvae/<v>/            the main protocol's (next to W/candidates)
    W/protocols/<protocol>/model_multvae/, .../export_multvae/<v>/   each other protocol's
    W/candidates/multvae/    candidates for the same splits as the CVAE's + baseline.json

One model per protocol that gets a CVAE (`pipeline.cvae_runs`, `train.protocols`), so
each protocol's table compares the CVAE with a Mult-VAE fitted on the same train split.
Slow (a full training run per protocol), so it is opt-in:
`--set 'evaluate.baselines=[..., "multvae"]'`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import posixpath

from recsys_cvae import spec as S
from recsys_cvae.baselines.build import PARAMS_FILE
from recsys_cvae.config import Config
from recsys_cvae.pipeline.cvae_runs import (
    CandidatesJob,
    export_models,
    plan_models,
    train_models,
    write_candidates,
)

NAME = "multvae"


def build_multvae(
    features_dir: str, candidates_dir: str, config: Config, generate_candidates: CandidatesJob
) -> dict:
    """Trains, exports and writes Mult-VAE candidates per protocol; returns the settings
    (protocol -> model_dir, export_dir, best_validation, splits, model)."""
    root = posixpath.dirname(candidates_dir.rstrip("/"))
    config = copy.deepcopy(config)
    config.model.use_condition = False
    config.model.conditional_prior = False
    # A baseline for the evaluation only: no served refit.
    models = plan_models(
        S.FeatureSpec.load(features_dir), config, root, suffix=f"_{NAME}", serving_refit=False
    )
    best = train_models(features_dir, models, config)
    exports = export_models(models, dataclasses.replace(config.export, verify=False))
    write_candidates(
        features_dir, candidates_dir, models, config, generate_candidates, model_name=NAME
    )
    params = {
        model.protocol: {
            "model_dir": model.model_dir, "export_dir": exports[model.protocol],
            "best_validation": best[model.protocol], "splits": list(model.splits),
            "model": {"use_condition": False, "conditional_prior": False},
        }
        for model in models
    }
    S.write_text(
        posixpath.join(candidates_dir, NAME, PARAMS_FILE), json.dumps(params, indent=2) + "\n"
    )
    return params
