"""Evaluation: hand-computed metrics on a 5-item catalogue, and the report files."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from recsys_cvae import spec as S
from recsys_cvae.config import Config, EvaluateConfig
from recsys_cvae.evaluation.evaluate import evaluate
from recsys_cvae.evaluation.report import format_table
from recsys_cvae.metrics import score_rankings
from tests.builders import TOY_ITEMS

LOG2_3 = math.log2(3)


ITEMS = TOY_ITEMS
TRUTH = {"u1": {"a", "c"}, "u2": {"b"}, "u4": {"e"}}


def test_score_rankings_by_hand():
    ranked = {"u1": ["a", "b", "c"], "u2": ["c", "d"], "u9": ["a"]}  # u4 missing, u9 unknown
    result = score_rankings(ranked, TRUTH, ks=[1, 2], num_items=len(ITEMS))
    # u1 hits at ranks 1 and 3; u2 none; u4 missing (0). Means over 3 users:
    assert result["recall@1"] == pytest.approx(0.5 / 3)  # u1: 1 hit / 2 relevant
    assert result["nrecall@1"] == pytest.approx(1 / 3)  # u1: 1 / min(1, 2)
    assert result["recall@2"] == pytest.approx(0.5 / 3)  # u1: 1 / min(2, 2)
    assert result["precision@2"] == pytest.approx(0.5 / 3)
    # u1 ndcg@2: dcg = 1, ideal = 1 + 1/log2(3)
    assert result["ndcg@2"] == pytest.approx((1 / (1 + 1 / LOG2_3)) / 3)
    assert result["mrr"] == pytest.approx(1 / 3)
    # Top-1 items of the evaluated users {a, c}; top-2 {a, b, c, d}; of 5 items.
    assert result["coverage@1"] == pytest.approx(0.4)
    assert result["coverage@2"] == pytest.approx(0.8)
    assert (result["users"], result["users_missing"]) == (3, 1)


def test_ndcg_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    truth = {f"u{u}": set(rng.choice(ITEMS, size=2, replace=False)) for u in range(6)}
    ranked = {u: list(rng.permutation(ITEMS)) for u in truth}
    ours = score_rankings(ranked, truth, ks=[3], num_items=len(ITEMS))["ndcg@3"]
    relevance = [[float(i in truth[u]) for i in ranked[u]] for u in sorted(truth)]
    scores = [[len(ITEMS) - r for r in range(len(ITEMS))] for _ in truth]
    assert ours == pytest.approx(sklearn_metrics.ndcg_score(relevance, scores, k=3))


def test_evaluate_writes_metrics_and_report(toy_dirs):
    features, candidates, report = toy_dirs
    metrics = evaluate(
        features, candidates, report, EvaluateConfig(ks=[1, 2], splits=["test", "cold"])
    )
    with open(os.path.join(report, "metrics.json")) as f:
        assert json.load(f) == metrics

    assert metrics["users"] == {
        "test": {"evaluated": 3, "without_targets": 1},
        "cold": {"evaluated": 1, "without_targets": 0},
    }
    m1, m2 = metrics["splits"]["test"]["m1"], metrics["splits"]["test"]["m2"]
    assert m1["ndcg@2"] == pytest.approx((1 / (1 + 1 / LOG2_3)) / 3)  # as in the case above
    assert m1["users_missing"] == 1  # u4
    # m2: every user's first item is a hit; u1 has 2 targets but 1 hit in its top 2.
    assert m2["nrecall@1"] == pytest.approx(1.0)
    assert m2["recall@1"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m2["recall@2"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert m2["ndcg@2"] == pytest.approx((1 / (1 + 1 / LOG2_3) + 1 + 1) / 3)
    assert m2["precision@2"] == pytest.approx(0.5)  # one hit in two slots (short lists pad)
    assert m2["coverage@1"] == pytest.approx(3 / 5)  # {c, b, e}
    assert set(metrics["splits"]["cold"]) == {"m1"}
    assert metrics["splits"]["cold"]["m1"]["ndcg@1"] == 1.0
    assert metrics["missing_splits"] == {"m2": ["cold"]}
    assert metrics["models"] == {"m1": "m1/1", "m2": "m2/1"}

    table = format_table(metrics, "test")
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | users | missing | ndcg@1 | recall@1 |")
    assert lines[2].startswith("| m2 | 3 | 0 | **1.0000** |")  # best ndcg@1 first, in bold
    assert lines[3].startswith("| m1 | 3 | 1 | 0.3333 |")
    with open(os.path.join(report, "report.md")) as f:
        text = f.read()
    assert "## test" in text and "## cold" in text
    assert format_table(metrics, "test", with_ci=True) in text


def test_format_table_names_unknown_split():
    with pytest.raises(ValueError, match="'validation' is not in the metrics"):
        format_table({"splits": {"test": {}}}, "validation")


def test_evaluate_adds_intervals_segments_paired_test_leaks_and_html(toy_dirs):
    features, candidates, report = toy_dirs
    with open(os.path.join(candidates, "m1", "baseline.json"), "w") as f:
        f.write("{}")  # marks m1 as a baseline
    config = EvaluateConfig(ks=[1, 2], splits=["test", "cold"], selection_metric="ndcg@2")
    metrics = evaluate(features, candidates, report, config)
    assert metrics["protocols"] == {"strong": "test", "cold": "cold"}
    assert metrics["baselines"] == ["m1"]
    low, high = metrics["ci"]["test"]["m2"]["ndcg@2"]
    assert low <= metrics["splits"]["test"]["m2"]["ndcg@2"] <= high
    # u2's history is [a] and m2 recommends [b, a]: one leak; m1 never repeats history.
    assert metrics["counts"]["test"]["m2"]["history_leaks"] == 1
    assert metrics["counts"]["test"]["m1"]["history_leaks"] == 0
    # Segments: region north = u1, south = u2, unknown = u4; m2 hits each user at rank 1.
    region = metrics["segments"]["test"]["m2"]["region"]
    assert {label: row["users"] for label, row in region.items()} == {
        "north": 1, "south": 1, "unknown": 1,
    }
    assert region["south"]["ndcg@2"] == 1.0  # segment metrics use the k closest to 10
    assert metrics["segments"]["test"]["m1"]["region"]["unknown"]["mrr"] == 0.0  # u4 missing
    activity = metrics["segments"]["test"]["m1"]["activity"]
    assert {label: row["users"] for label, row in activity.items()} == {"1-4": 3}
    paired = metrics["paired"]["test"]["m2"]
    assert paired["baseline"] == "m1" and paired["metric"] == "ndcg@2"
    assert paired["difference"] == pytest.approx(
        metrics["splits"]["test"]["m2"]["ndcg@2"] - metrics["splits"]["test"]["m1"]["ndcg@2"]
    )
    with open(os.path.join(report, "report.html")) as f:
        page = f.read()
    assert page.count("data:image/png;base64,") >= 4  # curves + tradeoffs per split, segments
    assert "Paired test" in page
    with open(os.path.join(report, "report.md")) as f:
        text = f.read()
    assert "### Per segment" in text and "**region**" in text


def test_every_protocol_of_the_feature_job_is_scored(features_dir, tmp_path):
    from recsys_cvae.baselines.build import build_baselines

    spec = S.FeatureSpec.load(features_dir)
    candidates, report = str(tmp_path / "candidates"), str(tmp_path / "report")
    config = EvaluateConfig(bootstrap_replicates=50)
    build_baselines(features_dir, candidates, Config(evaluate=config), 50, ["popularity", "ease"])
    metrics = evaluate(features_dir, candidates, report, config)
    expected = {
        protocol: roles["test"] for protocol, roles in spec.protocols.items()
        if roles.get("test") in spec.splits
    }
    assert metrics["protocols"] == expected and len(expected) >= 2
    for split in expected.values():
        assert set(metrics["splits"][split]) == {"popularity", "ease"}
        for name in ("popularity", "ease"):
            assert metrics["counts"][split][name]["history_leaks"] == 0
            assert metrics["counts"][split][name]["users_missing"] == 0
    # Popularity ignores the history: EASE must be better on the warm strong-protocol users.
    test = metrics["splits"][spec.protocol_split("test")]
    assert test["ease"]["ndcg@10"] > test["popularity"]["ndcg@10"]
