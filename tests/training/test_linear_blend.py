"""The closed-form linear term folded into the trained item-item branch: `training.linear_blend`,
its filter's pieces (`training.low_pass_blend`) and its fold-in slice (`training.fold_in_slice`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from recsys_cvae.model.cvae import build_model
from recsys_cvae.model.ease import ease_from_gram
from recsys_cvae.model.low_pass import low_pass_from_gram
from recsys_cvae.model.model_dir import load_trained_model
from recsys_cvae.spec import TRAIN, VALIDATION, FeatureSpec
from recsys_cvae.training.callbacks import RankingValidation
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.ease_blend import gram_matrix, validation_score
from recsys_cvae.training.fit import train
from recsys_cvae.training.linear_blend import choose_shape, fold_in_slice
from recsys_cvae.training.low_pass_blend import candidate_ranks, normalised_gram
from tests.builders import RecordWeights, small_config


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


def test_hold_out_moves_the_same_share_of_each_history_into_the_targets(features_dir):
    """Kept + held out = the user's history, the same items on every pass, ~10% held out;
    the slice's Grams see only the kept parts."""
    spec = FeatureSpec.load(features_dir)

    def histories(hold_out):
        rows = {}
        for batch in make_dataset(spec, TRAIN, 16, hold_out=hold_out):
            for user, history, targets in zip(batch["user_id"].numpy(),
                                              batch["history_item_ids"].numpy(),
                                              batch["target_item_ids"].numpy()):
                rows[user] = ({i for i in history if i}, {i for i in targets if i})
        return rows

    whole, held, again = histories(0.0), histories(0.1), histories(0.1)
    assert held == again and whole.keys() == held.keys()
    for user, (kept, targets) in held.items():
        assert kept | targets == whole[user][0] and not kept & targets
    share = sum(len(t) for _, t in held.values()) / sum(len(h) for h, _ in whole.values())
    assert 0.07 < share < 0.13

    model = build_model(spec, small_config(1).model)
    data = fold_in_slice(model, spec, TRAIN, 16, 0.1)
    assert len(data.truth) == len(data.inputs) == len(data.logits) > 0
    x = np.concatenate([model.history_input(b).numpy()
                        for b in make_dataset(spec, TRAIN, 16)]).astype(np.float64)
    assert data.degrees.sum() < x.sum()
    np.testing.assert_allclose(np.diag(data.gram).sum(), data.degrees.sum(), rtol=1e-5)


def test_the_slice_chooses_the_terms_shape_and_no_filter_is_a_candidate(features_dir):
    """λ is EASE's best on the slice; the filter joins only when it beats EASE there."""
    spec = FeatureSpec.load(features_dir)
    model = build_model(spec, small_config(1).model)
    held = fold_in_slice(model, spec, TRAIN, 16, 0.1)
    settings = small_config(1).model
    settings.linear_blend_lambdas = [1.0, 10.0, 1000.0]
    settings.low_pass_ranks, settings.low_pass_weights = [2, 4], [0.5, 1.0]
    shape = choose_shape(held, spec.splits[TRAIN].users, settings, "ndcg@10")
    seen = held.inputs > 0
    by_lambda = {l2: validation_score(held.inputs @ ease_from_gram(held.gram, l2), seen,
                                      held.truth, "ndcg@10") for l2 in (1.0, 10.0, 1000.0)}
    assert shape["l2"] == max(by_lambda, key=by_lambda.get)
    assert shape["fold_in_ndcg@10_ease"] == pytest.approx(max(by_lambda.values()))
    assert shape["fold_in_ndcg@10_low_pass"] >= shape["fold_in_ndcg@10_ease"]
    assert (shape["low_pass_relative"] > 0) == (
        shape["fold_in_ndcg@10_low_pass"] > shape["fold_in_ndcg@10_ease"])

    settings.low_pass_weights = []
    assert choose_shape(held, spec.splits[TRAIN].users, settings, "ndcg@10")[
        "low_pass_relative"] == 0.0


def test_no_linear_term_without_ease_lambdas(features_dir, tmp_path):
    """The filter is weighed against EASE's scores: with no λ to try there is no term."""
    config = small_config(1, strategy="default")
    config.model.low_pass_ranks = [2, 4]
    config.model.low_pass_weights = [0.5, 1.0]
    blend = train(features_dir, str(tmp_path), config).get("linear_blend")
    assert not blend or (blend["alpha"] == 0.0 and blend["low_pass_weight"] == 0.0)


def test_the_chosen_term_is_added_to_the_trained_branch_and_scores_as_reported(
    features_dir, tmp_path
):
    """B_best + α · (B_ease + r · S(rank, β)), chosen on the kept parts and built from every
    training interaction, is what `load_trained_model` returns, with the filter's recorded
    weight γ = α · r; it scores the validation NDCG@10 the blend reported, and the slice
    chose the filter because it beat EASE alone there."""
    config = small_config(2, strategy="default")
    config.model.linear_blend_lambdas = [10.0, 100.0]
    config.model.linear_blend_weights = [2.0, 5.0]
    config.model.low_pass_ranks = [2, 4, 8]
    config.model.low_pass_weights = [0.25, 0.5, 1.0]
    recorder = RecordWeights()
    result = train(features_dir, str(tmp_path), config, [recorder])
    blend = result["linear_blend"]
    assert blend["alpha"] in (2.0, 5.0), blend
    assert blend["low_pass_weight"] > 0, blend  # the planted tastes are low-rank: it helps
    assert blend["fold_in_ndcg@10_low_pass"] > blend["fold_in_ndcg@10_ease"]
    assert blend["low_pass_rank"] in (2, 4, 8) and blend["low_pass_exponent"] == 0.3
    assert blend["low_pass_shape"] == "cosine"
    assert blend["blend_ndcg@10"] > blend["blend_ndcg@10_before"]
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["trained_on"]["history_held_out"] == 0.1

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
    assert validation.evaluate()["ndcg@10"] == pytest.approx(blend["validation_ndcg@10"])


def test_an_unknown_filter_shape_is_refused_naming_the_field():
    from recsys_cvae.config import ConfigError, load_config

    assert load_config(None, ["model.low_pass_shape=ideal"]).model.low_pass_shape == "ideal"
    with pytest.raises(ConfigError, match="model.low_pass_shape takes one of cosine, ideal"):
        load_config(None, ["model.low_pass_shape=round"])


def test_a_held_out_share_outside_zero_to_one_is_refused_naming_the_field():
    from recsys_cvae.config import ConfigError, load_config

    assert load_config(None, ["model.linear_blend_held_out_share=0.2"]).model \
        .linear_blend_held_out_share == 0.2
    for bad in ("0", "1", "-0.1"):
        with pytest.raises(ConfigError, match="model.linear_blend_held_out_share must be "
                                              "between 0 and 1"):
            load_config(None, [f"model.linear_blend_held_out_share={bad}"])
