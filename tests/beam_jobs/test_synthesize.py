"""`recsys-cvae synthesize` on a real export: a Beam job over the `sample` signature writes
users.csv and interactions.csv that the feature job reads back, the same for the same seed."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from beam_jobs.features import build_features
from beam_jobs.synthesize import SynthesisError, synthesize
from recsys_cvae import spec as S
from recsys_cvae.config import ExportConfig, FeaturesConfig
from recsys_cvae.export.saved_model import export_model
from recsys_cvae.training.fit import train
from tests.builders import REPO, tiny_model_config


@pytest.fixture(scope="module")
def export_dir(features_dir, tmp_path_factory) -> str:
    model_dir = str(tmp_path_factory.mktemp("model"))
    train(features_dir, model_dir, tiny_model_config(15))
    return export_model(model_dir, str(tmp_path_factory.mktemp("export")),
                        ExportConfig(top_k=10, verify=False))


def run(export_dir: str, features_dir: str, out, users: int = 120, **kwargs) -> dict:
    return synthesize(export_dir, features_dir, str(out), users, save_main_session=False,
                      test_pipeline=BeamTestPipeline(), **kwargs)


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_users_copy_training_profiles_and_draw_distinct_known_items(
        export_dir, features_dir, tmp_path):
    written = run(export_dir, features_dir, tmp_path / "a", seed=3)
    users = rows(tmp_path / "a" / "users.csv")
    interactions = rows(tmp_path / "a" / "interactions.csv")
    assert written["users"] == len(users) == 120
    assert list(users[0]) == ["user_id", "age", "region", "device", "plan"]
    spec = S.FeatureSpec.load(features_dir)
    items = set(spec.item_vocabulary())
    per_user: dict[str, list[str]] = {}
    for row in interactions:
        per_user.setdefault(row["user_id"], []).append(row["item_id"])
    assert set(per_user) <= {u["user_id"] for u in users}
    assert all(len(set(v)) == len(v) and set(v) <= items for v in per_user.values())
    lengths = sorted(len(v) for v in per_user.values())
    assert lengths[0] >= 1 and lengths[-1] > lengths[0]  # copied lengths vary
    assert {u["region"] for u in users} <= set(spec.attribute_vocabulary("region")) | {""}


def test_the_same_seed_writes_the_same_bytes(export_dir, features_dir, tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run(export_dir, features_dir, tmp_path / name, users=60, seed=seed)
    read = {n: open(tmp_path / n / "interactions.csv", "rb").read() for n in "abc"}
    assert read["a"] == read["b"] and read["a"] != read["c"]
    assert not os.path.exists(tmp_path / "a" / ".parts")


def test_the_output_reads_back_as_features(export_dir, features_dir, tmp_path):
    written = run(export_dir, features_dir, tmp_path / "synthetic", users=150)
    spec = build_features(str(tmp_path / "synthetic"), str(tmp_path / "features"),
                          FeaturesConfig(), save_main_session=False, quiet=True)
    assert spec.counts["rows_valid"] == written["users"] + written["interactions"]
    assert spec.counts["rows_dead_lettered"] == 0


def test_overrides_and_a_population_file_choose_who_is_synthesized(
        export_dir, features_dir, tmp_path):
    run(export_dir, features_dir, tmp_path / "ios", users=50,
        overrides=["device=ios", "age=30..45"])
    users = rows(tmp_path / "ios" / "users.csv")
    assert {u["device"] for u in users} == {"ios"}
    assert all(30 <= float(u["age"]) <= 45 for u in users)
    population = tmp_path / "population.csv"
    population.write_text("region,device,weight\nnorth,web,3\nsouth,ios,1\n")
    run(export_dir, features_dir, tmp_path / "mix", users=400, population_file=str(population))
    users = rows(tmp_path / "mix" / "users.csv")
    north = sum(u["region"] == "north" for u in users)
    assert {(u["region"], u["device"]) for u in users} == {("north", "web"), ("south", "ios")}
    assert 250 <= north <= 350  # 300 expected
    with pytest.raises(SynthesisError, match="no training user matches"):
        run(export_dir, features_dir, tmp_path / "none", users=5, overrides=["age=900..901"])
    with pytest.raises(SynthesisError, match="expected INPUT=VALUE with INPUT one of age"):
        run(export_dir, features_dir, tmp_path / "none", users=5, overrides=["colour=red"])


@pytest.mark.parametrize("text, message", [
    ("device,weight\nios,-2\n", "line 2: weight '-2' is not a number ≥ 0"),
    ("device,weight\nios,nan\n", "line 2: weight 'nan' is not a number ≥ 0"),
    ("device,weight\nios,0\nweb,0\n", "every weight is 0"),
    ("device,age,weight\nios,old,1\n", "line 2: age 'old' is not a number"),
    ("device,age,weight\nios\n", "line 2: expected 3 fields"),
    ("device,weight\nios,1,extra\n", "line 2: expected 2 fields"),
])
def test_a_bad_population_file_is_one_line(export_dir, features_dir, tmp_path, text, message):
    population = tmp_path / "population.csv"
    population.write_text(text)
    with pytest.raises(SynthesisError) as error:
        run(export_dir, features_dir, tmp_path / "out", users=5,
            population_file=str(population))
    assert str(error.value) == f"{population}: {message}" or (
        str(error.value).startswith(f"{population}: {message}"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SynthesisError, match="exists and is not a folder"):
        run(export_dir, features_dir, tmp_path / "file", users=5)


@pytest.mark.slow  # a fresh CLI process: TensorFlow and Beam imported again
def test_the_command_writes_from_an_empty_folder(export_dir, features_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "recsys_cvae.cli", "synthesize", "--features-dir", features_dir,
         "--export-dir", export_dir, "--users", "20", "--out", "synthetic", "--set",
         "region=north"],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "synthesized 20 users" in result.stdout and str(tmp_path / "synthetic") in result.stdout
    assert {u["region"] for u in rows(tmp_path / "synthetic" / "users.csv")} == {"north"}


# ---- the fidelity and privacy report --------------------------------------------------------

def write_copies(features_dir: str, folder) -> int:
    """A 'synthetic' set that copies real users outright: what the privacy check must catch."""
    from recsys_cvae import user_records as UR

    spec = S.FeatureSpec.load(features_dir)
    folder.mkdir()
    users = list(UR.read_user_records(spec, "train"))
    with open(folder / "users.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "age", "region", "device", "plan"])
        for u in users:
            writer.writerow([u["user_id"], u["age"], u["region"], u["device"], u["plan"]])
    with open(folder / "interactions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id"])
        for u in users:
            writer.writerows([u["user_id"], i] for i in u["history_item_ids"])
    return len(users)


def test_the_report_measures_fidelity_and_catches_copies(export_dir, features_dir, tmp_path):
    from recsys_cvae.synthesis import page
    from recsys_cvae.synthesis.report import synthesis_report

    run(export_dir, features_dir, tmp_path / "synthetic", users=300, seed=2)
    report = synthesis_report(features_dir, str(tmp_path / "synthetic"), export_dir)
    assert report["privacy"]["exact_copies"] == 0 and report["privacy"]["closer_than_real"] < 0.5
    assert report["fidelity"]["popularity_spearman"] > 0.3
    assert report["train_on_synthetic"]["ease_ratio"] > 0
    assert report["fidelity"]["segments"][0]["segment"] == "all"
    assert report["generator_saw_test_users"] is False  # trained on the train split only
    assert report["goals"]["no_exact_copies"] is True
    data, html_page = page.write(report, str(tmp_path / "synthetic"))
    assert "Train on synthetic" in open(html_page).read() and os.path.exists(data)

    copies = write_copies(features_dir, tmp_path / "copies")
    copied = synthesis_report(features_dir, str(tmp_path / "copies"), export_dir)
    # train users' histories are the whole item sets of train users: all are exact copies
    assert copied["privacy"]["exact_copies"] == copies
    assert copied["goals"]["no_exact_copies"] is False


def test_membership_inference_runs_on_a_protocol_model(features_dir, tmp_path):
    from recsys_cvae.synthesis.membership import membership_auc

    model_dir = str(tmp_path / "model")
    train(features_dir, model_dir, tiny_model_config(3))
    aucs = membership_auc(model_dir, S.FeatureSpec.load(features_dir), max_users=200)
    assert set(aucs) == {"generator", "recommend_path"}
    assert all(0.3 < value < 0.9 for value in aucs.values())


def test_auc_is_the_mann_whitney_statistic():
    from recsys_cvae.synthesis.membership import auc

    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    assert auc(np.array([2.0, 2.0]), np.array([2.0, 2.0])) == 0.5  # ties count half


def test_timestamps_follow_the_sources_times(export_dir, features_dir, tmp_path):
    run(export_dir, features_dir, tmp_path / "timed", users=200, timestamps=True, seed=4)
    interactions = rows(tmp_path / "timed" / "interactions.csv")
    assert list(interactions[0]) == ["user_id", "item_id", "timestamp"]
    times = np.array([int(r["timestamp"]) for r in interactions])
    spec = S.FeatureSpec.load(features_dir)
    source = next(i["path"] for i in spec.counts["inputs"] if i["role"] == "interactions")
    real = np.array([int(r["timestamp"]) for r in rows(source)])
    assert real.min() <= times.min() and times.max() <= real.max()
    for q in (25, 50, 75):  # the same distribution: quartiles within 3% of the time range
        assert abs(np.percentile(times, q) - np.percentile(real, q)) < 0.03 * np.ptp(real)
    by_user: dict[str, list[int]] = {}
    for r in interactions:
        by_user.setdefault(r["user_id"], []).append(int(r["timestamp"]))
    assert all(v == sorted(v) for v in by_user.values())
    spec = build_features(str(tmp_path / "timed"), str(tmp_path / "features"), FeaturesConfig(),
                          save_main_session=False, quiet=True)
    assert "temporal" in spec.protocols  # the temporal protocol needs the times
