"""The feature spec's numeric boundaries: stored by the feature job, read back exactly."""

from __future__ import annotations

import json

import pytest

from recsys_cvae import spec as S


def _spec(*attributes: S.AttributeSpec) -> S.FeatureSpec:
    return S.FeatureSpec(attributes=attributes, item_vocabulary_file="vocab/items.txt",
                         num_items=3, splits={S.TRAIN: S.SplitSpec("train/*.gz", 1)})


def test_boundaries_round_trip_through_json_and_default_to_none():
    age = S.AttributeSpec("age", S.NUMERIC, mean=40.0, std=10.0, boundaries=[25, 40.5, 60])
    plan = S.AttributeSpec("plan", S.CATEGORICAL, "vocab/attr_plan.txt", 2)
    data = json.loads(json.dumps(_spec(age, plan).to_json()))  # as the file holds it
    assert data["attributes"][0]["boundaries"] == [25.0, 40.5, 60.0]
    assert "boundaries" not in data["attributes"][1]  # nothing to say for a categorical
    loaded = S.FeatureSpec.from_json(data)
    assert loaded.attributes[0].boundaries == (25.0, 40.5, 60.0)
    assert loaded.attributes[1].boundaries == ()


def test_boundaries_that_do_not_ascend_are_refused_naming_the_attribute():
    with pytest.raises(S.SpecError, match="attribute 'age': boundaries must ascend strictly"):
        S.AttributeSpec("age", S.NUMERIC, boundaries=[3.0, 3.0])
