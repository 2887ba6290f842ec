"""The one protocol planner: which model answers which split, fitted and tuned on which.

The synthetic fixture has timestamps, so the feature job wrote four protocols: strong (primary),
weak and temporal (each with train/validation/test) and cold (test only).
"""

from __future__ import annotations

import pytest

from recsys_cvae import protocols as P
from recsys_cvae import spec as S
from recsys_cvae.config import Config, ConfigError, EvaluateConfig


def test_every_trainable_protocol_answers_its_own_test_and_the_main_one_cold_start(features_dir):
    spec = S.FeatureSpec.load(features_dir)
    assert P.cvae_plan(spec, Config()) == [
        P.ProtocolFit("strong", "train", "validation", ("test", "cold"), True),
        P.ProtocolFit("weak", "weak_train", "weak_validation", ("weak_test",), False),
        P.ProtocolFit("temporal", "temporal_train", "temporal_validation",
                      ("temporal_test",), False),
    ]
    # The baselines ask the same planner: the same fits, the same splits.
    assert P.baseline_plan(spec, Config()) == P.cvae_plan(spec, Config())


def test_baselines_fit_every_protocol_even_when_the_cvae_trains_one(features_dir):
    spec = S.FeatureSpec.load(features_dir)
    config = Config()
    config.train.protocols = ["strong"]
    assert [fit.protocol for fit in P.cvae_plan(spec, config)] == ["strong"]
    assert [fit.protocol for fit in P.baseline_plan(spec, config)] == [
        "strong", "weak", "temporal"
    ]
    # Cold start (a protocol without a train role) goes to the main fit even when
    # evaluate.splits does not ask for it; splits the features lack are not planned.
    config.evaluate = EvaluateConfig(splits=["no_such_split"])
    assert P.baseline_plan(spec, config)[0].splits == ("test", "cold")


def test_a_weak_main_protocol_answers_cold_start_but_never_the_strong_test(features_dir):
    spec = S.FeatureSpec.load(features_dir)
    config = Config()
    config.train.protocol = "weak"
    (weak,) = P.cvae_plan(spec, config)
    assert (weak.protocol, weak.train, weak.splits, weak.main) == (
        "weak", "weak_train", ("weak_test", "cold"), True
    )
    # The strong protocol's test users are weak's training users: strong's own fit answers.
    fits = {fit.protocol: fit for fit in P.baseline_plan(spec, config)}
    assert fits["strong"].splits == ("test",) and fits["weak"].splits == ("weak_test", "cold")


def test_fit_splits_and_evaluation_splits(features_dir):
    spec = S.FeatureSpec.load(features_dir)
    assert P.fit_splits(spec) == ("train", "validation")
    assert P.fit_splits(spec, "temporal") == ("temporal_train", "temporal_validation")
    assert P.evaluation_splits(spec, EvaluateConfig()) == {
        "test": "strong", "weak_test": "weak", "temporal_test": "temporal", "cold": "cold"
    }
    assert P.train_split(spec, "cold") == "train"  # cold start is trained elsewhere


@pytest.mark.parametrize(
    "protocols, main, message",
    [
        (["random"], "", r"train.protocols names \['random'\]"),
        (["cold", "strong"], "", r"train.protocols names \['cold'\]"),
        (["weak"], "", "leaves out the main protocol 'strong'"),
        ([], "cold", "train.protocol 'cold' has no train split"),
    ],
)
def test_bad_protocol_choices_are_one_clear_error(features_dir, protocols, main, message):
    config = Config()
    config.train.protocols = protocols
    config.train.protocol = main
    with pytest.raises(ConfigError, match=message):
        P.cvae_protocols(S.FeatureSpec.load(features_dir), config.train)
