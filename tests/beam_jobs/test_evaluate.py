"""The Beam evaluation job and the in-process evaluation give the same numbers."""

from __future__ import annotations

import json
import math

import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from beam_jobs import evaluate as beam_evaluate
from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S
from recsys_cvae.config import EvaluateConfig
from recsys_cvae.evaluation import evaluate as E
from recsys_cvae.evaluation import scoring as Sc


def _close(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == pytest.approx(b)


@pytest.mark.parametrize("model", ["m1", "m2"])
def test_beam_summary_equals_in_process_summary(toy_dirs, tmp_path, model):
    features, candidates, _ = toy_dirs
    config = EvaluateConfig(ks=[1, 2])
    spec = S.FeatureSpec.load(features)
    truth, _, context = E.scoring_inputs(spec, "test", "strong", config)
    paths = C.split_files(candidates, model, "test")
    expected = Sc.summarise(
        E.score_files(paths, truth, context, spec.item_vocabulary(), batch_rows=2), context
    )
    output = str(tmp_path / "summary.json")
    summary = beam_evaluate.run(
        [
            f"--features-dir={features}", f"--candidates-dir={candidates}",
            f"--model={model}", "--split=test", f"--output={output}", "--set=evaluate.ks=[1, 2]",
        ],
        save_main_session=False,
        test_pipeline=TestPipeline(),
    )
    with open(output) as f:
        assert json.load(f) == summary
    _close(json.loads(json.dumps(expected)), summary)
    assert summary["counts"]["users"] == 3
