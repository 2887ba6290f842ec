"""`beam_jobs.model_handler.ExportModelHandler` in a user's own Beam pipeline: RunInference
over a real export's signatures, answers as TF Serving's (expected values: the tiny served
model of tests/serving/conftest.py)."""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.model_handler import ExportModelHandler
from tests.builders import V1_SCORES, save_version


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return save_version(str(tmp_path_factory.mktemp("base")), 1, V1_SCORES)


def top(result) -> tuple:
    return tuple(result.inference["item_ids"].tolist())


def test_recommend_and_generate_through_run_inference(export_dir):
    users = [{"item_ids": ["i1"], "region": "north", "age": 30.0},
             {"item_ids": [], "region": "south", "age": None},  # None: unknown
             {"item_ids": ["i2", "i3"], "region": "north"}]  # a missing input: unknown
    with TestPipeline() as p:
        recommended = (p | "Users" >> beam.Create(users)
                       | "Recommend" >> RunInference(ExportModelHandler(export_dir))
                       | "TopR" >> beam.Map(top))
        # user 0 saw i1: i5 (11), i2, i3; user 1: south adds 10 to i4; user 2 saw i2, i3
        assert_that(recommended, equal_to([("i5", "i2", "i3"), ("i4", "i1", "i2"),
                                           ("i5", "i1", "i4")]), label="CheckRecommend")
        generated = (p | "Profiles" >> beam.Create([{"region": "south", "age": 3.0}])
                     | "Generate" >> RunInference(ExportModelHandler(export_dir, "generate"))
                     | "TopG" >> beam.Map(top))
        assert_that(generated, equal_to([("i4", "i1", "i2")]), label="CheckGenerate")


def test_scores_come_back_as_float_rows(export_dir):
    handler = ExportModelHandler(export_dir, "recommend")
    model = handler.load_model()
    [result] = list(handler.run_inference([{"item_ids": ["i1"], "region": "north", "age": 1}],
                                          model))
    assert result.inference["scores"].dtype == np.float32
    assert math.isclose(float(result.inference["scores"][0]), 11.0)


def test_an_input_the_signature_lacks_is_named(export_dir):
    handler = ExportModelHandler(export_dir, "generate")
    with pytest.raises(ValueError, match=r"inputs \['colour'\] are not inputs of generate"):
        list(handler.run_inference([{"region": "north", "colour": "red"}], handler.load_model()))
    with pytest.raises(ValueError, match="no signature 'classify'"):
        ExportModelHandler(export_dir, "classify").load_model()
