"""The serving refit: the selected settings, fitted again on every user and interaction."""

from __future__ import annotations

import json
import math
import os

from recsys_cvae import protocols as P
from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.config import Config
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.refit import refit, refit_config
from tests.builders import small_config


def test_refit_config_takes_the_selected_epochs_and_final_beta():
    config = Config()
    selected = {"best_epoch": 7, "best_beta": 0.05, "linear_blend": {"alpha": 2.0, "l2": 50.0}}
    settings = refit_config(config, selected)
    assert (settings.train.epochs, settings.train.beta_cap) == (7, 0.05)
    assert settings.train.early_stopping_patience == 0  # no validation left to stop on
    assert settings.model.linear_blend_lambdas == []  # the blend's choice is reused
    assert config.train.epochs == 100 and config.train.beta_cap == Config().train.beta_cap
    # A NaN β (no epoch logged one) keeps the configured cap.
    assert refit_config(config, {"best_epoch": 3, "best_beta": math.nan}).train.beta_cap == (
        config.train.beta_cap)


def test_folded_splits_give_every_interaction_as_history(features_dir):
    spec = S.FeatureSpec.load(features_dir)
    splits = P.refit_splits(spec)
    assert splits == ("train", "validation", "test", "cold")
    records = {r[S.USER_ID]: r for s in splits for r in UR.read_user_records(spec, s)}
    seen = {}
    for batch in make_dataset(spec, splits, batch_size=64, fold_targets=True):
        assert batch[S.TARGETS].shape[1] == 0
        for user, row in zip(batch[S.USER_ID].numpy(), batch[S.HISTORY].numpy()):
            seen[user.decode()] = sorted(i.decode() for i in row if i)
    assert len(seen) == len(records) == sum(spec.splits[s].users for s in splits)
    for user, record in records.items():
        assert seen[user] == sorted(record[S.HISTORY] + record[S.TARGETS])


def test_refit_trains_the_selected_epochs_on_all_users_and_records_it(features_dir, tmp_path):
    config = small_config(5)
    config.train.beta_anneal_steps = -1  # the default: annealed over the whole run
    config.model.linear_blend_lambdas = [10.0]  # the selected run chose α = 1 at λ = 10, p = 0.33
    chosen = {"alpha": 1.0, "l2": 10.0, "dropout": 0.33,
              "low_pass_rank": 4, "low_pass_exponent": 0.3, "low_pass_weight": 0.5}
    selected = {"best_epoch": 2, "best_beta": 0.01, "linear_blend": chosen}
    result = refit(features_dir, str(tmp_path), config, "strong", selected)
    assert result["epochs_run"] == 2 and result["linear_blend"] == chosen
    with open(os.path.join(tmp_path, "config.json")) as f:
        saved = json.load(f)
    spec = S.FeatureSpec.load(features_dir)
    assert saved["trained_on"] == {
        "splits": ["train", "validation", "test", "cold"], "validation": None,
        "users": sum(spec.splits[s].users for s in ("train", "validation", "test", "cold")),
        "targets_in_history": True, "history_held_out": 0.0, "refit_of": "strong",
        "epochs": 2, "beta_cap": 0.01,
    }
    with open(os.path.join(tmp_path, "training_metrics.json")) as f:
        history = json.load(f)["history"]
    # β is annealed over the refit's own run up to the selected epoch's β: the last epoch's
    # mean β lies in its upper half (linear rise over 2 epochs), never above it.
    assert 0.5 * 0.01 < history[-1]["beta"] <= 0.01 + 1e-9
