"""The HTML report's sections and figures: the data, the training run, coinciding baselines
drawn once, per-segment bars with users and intervals, readable numeric bins."""

from __future__ import annotations

import numpy as np

from recsys_cvae.config import EvaluateConfig
from recsys_cvae.evaluation.evaluate import evaluate, numeric_labels
from recsys_cvae.evaluation.figures import coinciding, segments_figure, shown_models
from recsys_cvae.evaluation.run_overview import dataset_section, training_section
from recsys_cvae.spec import FeatureSpec

HISTORY = [
    {"epoch": 1, "loss": 9.0, "reconstruction": 8.0, "kl": 1.0, "val_loss": 8.5,
     "val_ndcg@10": 0.20},
    {"epoch": 2, "loss": 7.0, "reconstruction": 6.5, "kl": 0.5, "val_loss": 7.5,
     "val_ndcg@10": 0.25},
]
RECORD = {"training": {"history": HISTORY, "best_epoch": 2, "selection_metric": "ndcg@10",
                       "linear_blend": {"alpha": 5.0, "l2": 500.0}},
          "config": {"train": {"protocol": "strong", "epochs": 2}, "features_dir": "/x"}}


def test_models_that_rank_alike_are_grouped_under_popularity():
    same = {"ndcg@10": 0.4, "recall@20": 0.2}
    split = {"cvae": {"ndcg@10": 0.7, "recall@20": 0.3}, "ease": same, "item_knn": same,
             "popularity": dict(same)}
    assert coinciding(split) == {"cvae": [], "popularity": ["ease", "item_knn"]}
    assert shown_models(split) == {"cvae": "cvae", "popularity": "popularity = ease = item_knn"}


def test_segment_bars_carry_users_and_leave_out_one_segment_charts():
    row = {"ndcg@10": 0.5, "users": 12, "ci": {"ndcg@10": [0.4, 0.6]}}
    metrics = {
        "splits": {"cold": {"cvae": {"ndcg@10": 0.5}}},
        "segments": {"cold": {"cvae": {"activity": {"0": row},
                                       "region": {"north": row, "south": dict(row, users=3)}}}},
    }
    figure = segments_figure(metrics, "cold")
    assert len(figure.axes) == 1  # activity has one segment only: no chart
    ticks = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert ticks == ["north\n12 users", "south\n3 users"]
    assert segments_figure({**metrics, "segments": {"cold": {"cvae": {"activity": {"0": row}}}}},
                           "cold") is None


def test_numeric_bins_have_edges_a_person_reads():
    ages = np.arange(16, 75, dtype=float)
    labels = set(numeric_labels(ages, 4))
    assert all("." not in label for label in labels), labels
    scores = np.linspace(0.0, 4.9, 50)
    assert all(len(label.split("-")[0].split(".")[-1]) <= 1 for label in numeric_labels(scores, 4))


def test_training_section_shows_the_kept_epoch_and_choices():
    page = training_section(RECORD)
    assert "Training (strong protocol)" in page and "the kept epoch is 2" in page
    assert "linear_blend: alpha" in page and "data:image/png;base64," in page
    assert "The run&#x27;s resolved config" in page or "resolved config" in page
    assert training_section(None) == "" and training_section({"training": {}}) == ""


def test_the_page_opens_with_the_data_and_the_training_run(toy_dirs):
    features, candidates, report = toy_dirs
    spec = FeatureSpec.load(features)
    data = dataset_section(spec)
    assert "<h2>Data</h2>" in data and "density" in data and "users" in data
    evaluate(features, candidates, report, EvaluateConfig(ks=[1, 2], splits=["test"]),
             training=RECORD)
    page = open(f"{report}/report.html").read()
    assert page.index("<h2>Data</h2>") < page.index("Training (strong protocol)") < page.index(
        "<h2>test")
