"""The low-pass filter folded into the trained item-item branch (`training.low_pass_blend`)."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_cvae.model.cvae import build_model
from recsys_cvae.model.ease import ease_from_gram
from recsys_cvae.model.low_pass import low_pass_from_gram
from recsys_cvae.model.model_dir import load_trained_model
from recsys_cvae.spec import TRAIN, VALIDATION, FeatureSpec
from recsys_cvae.training.callbacks import RankingValidation
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.ease_blend import gram_matrix
from recsys_cvae.training.fit import train
from recsys_cvae.training.fold_in_slice import fold_in_slice
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


def test_the_fold_in_slice_holds_out_a_share_of_each_users_items(features_dir):
    """Kept + held out = the user's input; the Grams are the kept parts'; ~10% held out."""
    spec = FeatureSpec.load(features_dir)
    model = build_model(spec, small_config(1).model)
    data = fold_in_slice(model, spec, TRAIN, 16, share=0.1, seed=3)
    x = np.concatenate([model.history_input(b).numpy()
                        for b in make_dataset(spec, TRAIN, 16)]).astype(np.float64)
    assert data.truth and len(data.truth) == len(data.inputs)
    held = sum(len(t) for t in data.truth)
    kept = int((data.inputs > 0).sum())
    assert 0.05 < held / (held + kept) < 0.15
    for row, truth in zip(data.inputs, data.truth):
        assert not any(row[i] > 0 for i in truth) and (row > 0).any()
    # every kept row is some user's input with its held-out items zeroed
    originals = {tuple(np.flatnonzero(r)) for r in x}
    for row, truth in zip(data.inputs, data.truth):
        assert tuple(sorted(set(np.flatnonzero(row)) | truth)) in originals
    assert data.degrees.sum() < x.sum()  # the Grams see only the kept parts
    np.testing.assert_allclose(np.diag(data.gram).sum(), data.degrees.sum(), rtol=1e-5)


def test_no_filter_without_an_ease_blend_to_weigh_it_against(features_dir, tmp_path):
    config = small_config(1, strategy="default")
    config.model.low_pass_ranks = [2, 4]
    config.model.low_pass_weights = [0.5, 1.0]
    result = train(features_dir, str(tmp_path), config)
    assert result["linear_blend"]["low_pass_weight"] == 0.0


def test_the_chosen_filter_is_added_to_the_trained_branch_and_scores_as_reported(
    features_dir, tmp_path
):
    """B_best + α · B_ease + γ · S(rank, β) is what `load_trained_model` returns, with γ the
    slice's relative weight times α; it scores the validation NDCG@10 the blend reported,
    and the slice chose it because it beat EASE alone there."""
    config = small_config(2, strategy="default")
    config.model.linear_blend_lambdas = [10.0, 100.0]
    config.model.low_pass_ranks = [2, 4, 8]
    config.model.low_pass_weights = [0.25, 0.5, 1.0]
    recorder = RecordWeights()
    result = train(features_dir, str(tmp_path), config, [recorder])
    blend = result["linear_blend"]
    assert blend["alpha"] > 0, blend
    assert blend["low_pass_weight"] > 0, blend  # the planted tastes are low-rank: it helps
    assert blend["fold_in_ndcg@10_low_pass"] > blend["fold_in_ndcg@10_ease"]
    assert blend["low_pass_rank"] in (2, 4, 8) and blend["low_pass_exponent"] == 0.3
    assert blend["low_pass_shape"] == "cosine"

    model = load_trained_model(str(tmp_path))
    spec = FeatureSpec.load(features_dir)
    trained_branch = recorder.branches[result["best_epoch"] - 1]
    ease = ease_from_gram(gram_matrix(model, spec, TRAIN, 64), blend["l2"])
    gram, degrees = normalised_gram(model, spec, TRAIN, 64)
    low_pass = low_pass_from_gram(gram, degrees, blend["low_pass_rank"], 0.3, tapered=True)
    np.testing.assert_allclose(
        model.item_item.weights_matrix.numpy(),
        trained_branch + blend["alpha"] * ease + blend["low_pass_weight"] * low_pass,
        atol=1e-4,
    )
    validation = RankingValidation(make_dataset(spec, VALIDATION, 64), "", "", patience=0)
    validation.set_model(model)
    assert validation.evaluate()["ndcg@10"] == pytest.approx(blend["validation_ndcg@10_low_pass"])


def test_an_unknown_filter_shape_is_refused_naming_the_field():
    from recsys_cvae.config import ConfigError, load_config

    assert load_config(None, ["model.low_pass_shape=ideal"]).model.low_pass_shape == "ideal"
    with pytest.raises(ConfigError, match="model.low_pass_shape takes one of cosine, ideal"):
        load_config(None, ["model.low_pass_shape=round"])
