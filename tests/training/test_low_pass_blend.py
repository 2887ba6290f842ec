"""The low-pass filter folded into the trained item-item branch (`training.low_pass_blend`)."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_cvae.model.cvae import build_model
from recsys_cvae.model.low_pass import low_pass_from_gram
from recsys_cvae.model.model_dir import load_trained_model
from recsys_cvae.spec import TRAIN, VALIDATION, FeatureSpec
from recsys_cvae.training.callbacks import RankingValidation
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.fit import train
from recsys_cvae.training.low_pass_blend import candidate_ranks, normalised_gram
from tests.builders import small_config
from tests.training.test_fit import RecordWeights


def test_ranks_too_close_to_the_data_size_are_not_tried():
    assert candidate_ranks([8, 16, 64, 256], num_users=943, num_items=1682) == [8, 16, 64]
    assert candidate_ranks([8, 16], num_users=20, num_items=1000) == []


def test_normalised_gram_weights_each_user_by_one_over_their_total(features_dir):
    spec = FeatureSpec.load(features_dir)
    model = build_model(spec, small_config(1).model)
    gram, degrees = normalised_gram(model, spec, TRAIN, 16)
    x = np.concatenate([model.history_input(b).numpy()
                        for b in make_dataset(spec, TRAIN, 16)]).astype(np.float64)
    np.testing.assert_allclose(gram, (x / x.sum(1, keepdims=True)).T @ x, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(degrees, x.sum(0), rtol=1e-5)


def test_the_chosen_filter_is_added_to_the_trained_branch_and_scores_as_reported(
    features_dir, tmp_path
):
    """B_best + γ · S(rank, β) is what `load_trained_model` returns, and it scores the
    validation NDCG@10 the blend reported, never below what it started from."""
    config = small_config(2, strategy="default")
    config.model.low_pass_ranks = [2, 4, 8]
    config.model.low_pass_weights = [0.25, 0.5, 1.0]
    recorder = RecordWeights()
    result = train(features_dir, str(tmp_path), config, [recorder])
    blend = result["linear_blend"]
    key = "validation_ndcg@10_low_pass"
    assert blend[key] >= blend[f"{key}_before"]
    assert blend["low_pass_weight"] > 0, blend  # the planted tastes are low-rank: it helps
    assert blend["low_pass_rank"] in (2, 4, 8) and blend["low_pass_exponent"] == 0.3

    model = load_trained_model(str(tmp_path))
    spec = FeatureSpec.load(features_dir)
    trained_branch = recorder.branches[result["best_epoch"] - 1]
    gram, degrees = normalised_gram(model, spec, TRAIN, 64)
    low_pass = low_pass_from_gram(gram, degrees, blend["low_pass_rank"], 0.3)
    np.testing.assert_allclose(
        model.item_item.weights_matrix.numpy(),
        trained_branch + blend["low_pass_weight"] * low_pass, atol=1e-4,
    )
    validation = RankingValidation(make_dataset(spec, VALIDATION, 64), "", "", patience=0)
    validation.set_model(model)
    assert validation.evaluate()["ndcg@10"] == pytest.approx(blend[key])
