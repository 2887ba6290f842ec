"""`assets.extra/provenance.json` and the model card, on a real export of a trained model.

The digests are recomputed from the raw files with hashlib, the time window from the raw
interactions, the spec's hash from the features folder: the provenance must say what a
reviewer finds on disk.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import os
import subprocess

import pytest

from recsys_cvae.config import ExportConfig
from recsys_cvae.export import model_card as C
from recsys_cvae.export import provenance as P
from recsys_cvae.export.saved_model import export_model
from recsys_cvae.training.fit import train
from tests.builders import REPO, tiny_model_config


@pytest.fixture(scope="module")
def exported(features_dir, tmp_path_factory) -> tuple[str, str]:
    """(model_dir, export_dir) of a CVAE trained for one epoch on the synthetic features."""
    model_dir = str(tmp_path_factory.mktemp("model"))
    train(features_dir, model_dir, tiny_model_config(1))
    base = str(tmp_path_factory.mktemp("export"))
    return model_dir, export_model(model_dir, base, ExportConfig(top_k=10, verify=False))


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_every_input_file_is_recorded_with_its_bytes_and_sha256(exported):
    _, export_dir = exported
    data = P.read_provenance(export_dir)["data"]
    inputs = {entry["role"]: entry for entry in data["inputs"]}
    assert set(inputs) == {"interactions", "users", "items"}
    assert len({os.path.dirname(e["path"]) for e in inputs.values()}) == 1  # one raw folder
    for entry in inputs.values():
        assert entry["bytes"] == os.path.getsize(entry["path"])
        assert entry["sha256"] == sha256(entry["path"])
    with open(inputs["interactions"]["path"]) as f:
        rows = list(csv.DictReader(f))
    assert inputs["interactions"]["rows_read"] == len(rows)
    assert data["rows_read"] == sum(e["rows_read"] for e in inputs.values() if e["rows_read"])
    assert data["rows_valid"] + data["rows_dead_lettered"] == data["rows_read"]
    times = [int(row["timestamp"]) for row in rows]
    window = data["time_window"]
    assert (window["first_unix"], window["last_unix"]) == (min(times), max(times))
    assert window["first"] == datetime.datetime.fromtimestamp(
        min(times), datetime.UTC).isoformat(timespec="seconds")


def test_features_config_training_and_code_are_recorded(features_dir, exported):
    model_dir, export_dir = exported
    provenance = P.read_provenance(export_dir)
    assert provenance["features"]["feature_spec_sha256"] == sha256(
        os.path.join(features_dir, "feature_spec.json"))
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    assert provenance["trained_on"] == config["trained_on"]
    assert provenance["config"]["model"] == config["model"]
    assert provenance["training"]["best_epoch"] == 1
    assert provenance["training"]["validation"]["ndcg@10"] > 0
    created = datetime.datetime.fromisoformat(provenance["created"])
    assert abs((datetime.datetime.now(datetime.UTC) - created).total_seconds()) < 3600
    code = provenance["code"]
    assert code["version"] and code["package"] == "recsys-cvae"
    if os.path.isdir(os.path.join(REPO, ".git")):
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert code["git_commit"] == head and isinstance(code["git_dirty"], bool)
    assert provenance["evaluation"] is None  # added by the pipeline after its evaluation


def metrics_json() -> dict:
    """A report's metrics.json in the shape `evaluate` writes (two protocols, segments)."""
    groups = {"north": {"ndcg@10": 0.30, "users": 40, "ci": {"ndcg@10": [0.25, 0.35]}},
              "south": {"ndcg@10": 0.18, "users": 35, "ci": {"ndcg@10": [0.14, 0.22]}},
              "tiny": {"ndcg@10": 0.01, "users": 2, "ci": {"ndcg@10": [0.0, 0.1]}}}
    scores = {"cvae": {"ndcg@10": 0.25, "recall@20": 0.3, "coverage@10": 0.4},
              "ease": {"ndcg@10": 0.24, "recall@20": 0.29, "coverage@10": 0.2}}
    return {
        "protocols": {"strong": "test", "cold": "cold"},
        "splits": {"test": scores, "cold": {"cvae": {"ndcg@10": 0.5},
                                            "segment_popularity": {"ndcg@10": 0.48}}},
        "ci": {"test": {"cvae": {"ndcg@10": [0.2, 0.3]}}},
        "users": {"test": {"evaluated": 75}, "cold": {"evaluated": 20}},
        "segments": {"test": {"cvae": {"region": groups}}},
    }


def test_the_evaluation_is_added_and_the_card_rewritten(exported, tmp_path):
    model_dir, export_dir = exported
    copy = str(tmp_path / "1")
    subprocess.run(["cp", "-r", export_dir, copy], check=True)
    P.record_evaluation(copy, metrics_json(), {"strong": model_dir})
    evaluation = P.read_provenance(copy)["evaluation"]
    assert evaluation["strong"]["test"]["cvae"] == {
        "ndcg@10": 0.25, "recall@20": 0.3, "coverage@10": 0.4, "ci": {"ndcg@10": [0.2, 0.3]}}
    assert evaluation["strong"]["validation"]["ndcg@10"] > 0  # the protocol model's run
    assert evaluation["strong"]["users"] == 75
    markdown, page = C.write_model_card(copy)
    card = open(markdown).read()
    for title in ("## Model details", "## Intended use", "## Training data",
                  "## Evaluation data and quantitative analyses", "## Per-group quality",
                  "## Cold-start behaviour", "## Policy in force", "## Ethical considerations",
                  "## Caveats and recommendations"):
        assert title in card
    # the gap is between groups with enough users: "tiny" (2 users) is listed, not compared
    assert "Largest gap between attribute groups: region on the strong protocol, 0.120" in card
    assert "| strong | region | tiny | 2 |" in card
    assert "NDCG@10 0.5000 against segment_popularity's 0.4800" in card
    html = open(page).read()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http" not in html


def test_an_export_carries_a_card_before_any_evaluation(exported):
    _, export_dir = exported
    folder = os.path.join(export_dir, "assets.extra")
    card = open(os.path.join(folder, C.CARD_MARKDOWN)).read()
    assert "Not evaluated yet" in card
    inputs = P.read_provenance(export_dir)["data"]["inputs"]
    assert all(entry["sha256"][:16] in card for entry in inputs)
    assert os.path.exists(os.path.join(folder, C.CARD_HTML))


def test_the_server_logs_a_line_of_it_when_it_loads_the_version(exported, caplog):
    from serving.server import ModelServer

    _, export_dir = exported
    provenance = P.read_provenance(export_dir)
    server = ModelServer(os.path.dirname(export_dir), port=0, poll_interval_s=60.0)
    with caplog.at_level("INFO", logger="serving"):
        server.start()
        server.stop(grace_s=1.0)
    line = next(r.getMessage() for r in caplog.records if "warmup requests" in r.getMessage())
    assert f"created {provenance['created']}" in line
    assert f"trained on {provenance['trained_on']['users']} users" in line
    assert provenance["features"]["feature_spec_sha256"] in line
