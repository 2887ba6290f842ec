"""One CVAE per protocol: the plan (which protocols, which folders, which splits) and the
train → export → candidates → evaluate stages run by hand through `recsys-cvae`.

The synthetic fixture has timestamps, so the feature job wrote four protocols: strong (primary),
weak and temporal (each with train/validation/test) and cold (test only).
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

from recsys_cvae import candidates_format as C
from recsys_cvae import protocols as P
from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.cli import main
from recsys_cvae.config import Config
from recsys_cvae.pipeline.cvae_runs import forget_sources, plan_models


def test_every_protocol_gets_a_cvae_and_the_served_one_is_refitted_on_all_data(features_dir):
    spec = S.FeatureSpec.load(features_dir)
    models = plan_models(spec, Config(), "W")
    assert [(m.label, m.main, m.served) for m in models] == [
        ("strong", True, False), ("weak", False, False), ("temporal", False, False),
        ("serving", False, True),
    ]
    strong, weak, temporal, serving = models
    # The protocol models answer the evaluation, the primary one also cold start.
    assert (strong.model_dir, strong.export_base, strong.splits) == (
        "W/protocols/strong/model", "W/protocols/strong/export", ("test", "cold")
    )
    assert (weak.model_dir, weak.export_base, weak.splits) == (
        "W/protocols/weak/model", "W/protocols/weak/export", ("weak_test",)
    )
    assert temporal.splits == ("temporal_test",)
    # The served model keeps the standard folders, reuses strong's selection, answers nothing.
    assert (serving.protocol, serving.model_dir, serving.export_base, serving.splits) == (
        "strong", "W/model", "W/export", ()
    )
    # Without the refit the primary protocol model is served, from the standard folders.
    config = Config()
    config.train.serving_refit = False
    assert [(m.model_dir, m.served) for m in plan_models(spec, config, "W")][0] == (
        "W/model", True
    )
    # The Mult-VAE variant (a baseline: never refitted) lives next to it; explicit main
    # folders win.
    variant = plan_models(spec, Config(), "W", "M", "E", suffix="_multvae", serving_refit=False)
    assert [m.model_dir for m in variant] == [
        "M", "W/protocols/weak/model_multvae", "W/protocols/temporal/model_multvae"
    ]


def test_train_protocols_limits_the_cvaes_and_train_protocol_alone_is_one(features_dir):
    spec = S.FeatureSpec.load(features_dir)
    config = Config()
    config.train.protocols = ["strong"]
    assert [m.label for m in plan_models(spec, config, "W")] == ["strong", "serving"]
    config.train.protocols = ["temporal", "strong"]
    assert P.cvae_protocols(spec, config.train) == ("strong", ["strong", "temporal"])

    # One explicit protocol, as before: it is the main model and answers cold start, but not
    # the strong test users (whose targets a weak model has trained on).
    config = Config()
    config.train.protocol = "weak"
    weak, serving = plan_models(spec, config, "W")
    assert (weak.protocol, weak.model_dir) == ("weak", "W/protocols/weak/model")
    assert weak.splits == ("weak_test", "cold")
    # The served refit reuses the main protocol's selection, on all the data.
    assert (serving.protocol, serving.model_dir, serving.refit) == ("weak", "W/model", True)


def test_an_explicit_export_run_drops_the_splits_it_answered_from_the_sources(tmp_path):
    folder = tmp_path / "cvae"
    folder.mkdir()
    both = {"test": {"protocol": "strong"}, "weak_test": {"protocol": "weak"}}
    (folder / "sources.json").write_text(json.dumps(both))
    forget_sources(str(tmp_path), ["test", "cold"])
    assert C.read_sources(str(tmp_path)) == {"weak_test": {"protocol": "weak"}}


def _recommend(export_dir: str, spec: S.FeatureSpec, records: list[dict]) -> list[list[str]]:
    """The export's `recommend` top-K item ids for decoded user records."""
    width = max(len(r[S.HISTORY]) for r in records)
    inputs = {"item_ids": [r[S.HISTORY] + [""] * (width - len(r[S.HISTORY])) for r in records]}
    for attribute in spec.attributes:
        values = [r.get(attribute.name) for r in records]
        inputs[attribute.name] = (
            [str(v or "") for v in values] if attribute.is_categorical
            else np.array([np.nan if v is None else v for v in values], np.float32)
        )
    loaded = tf.saved_model.load(export_dir)
    outputs = loaded.signatures["recommend"](**{k: tf.constant(v) for k, v in inputs.items()})
    return [[i.decode() for i in row if i] for row in outputs["item_ids"].numpy()]


def test_stages_by_hand_give_each_protocol_its_own_cvae(features_dir, tmp_path):
    work = str(tmp_path / "w")
    config = tmp_path / "tiny.toml"
    config.write_text(
        "[model]\nlatent_dim = 8\nhidden_dims = [16]\ncondition_dim = 8\n"
        "[train]\nepochs = 1\nverbose = 0\nstrategy = \"default\"\n"
        "[export]\ntop_k = 20\nverify = false\n"
        "[evaluate]\nbaselines = [\"popularity\", \"ease\"]\nease_lambdas = [10.0]\n"
        "bootstrap_replicates = 10\nks = [10]\n"
    )
    common = ["--workdir", work, "--features-dir", features_dir, "--config", str(config), "-q"]
    # Strong and weak only: temporal keeps its baselines but gets no CVAE.
    assert main(["train", "--protocols", "strong,weak", *common]) == 0
    assert main(["export", "--protocols", "strong,weak", *common]) == 0
    # A stale CVAE file from an earlier run with temporal must not survive the candidates run.
    candidates = os.path.join(work, "candidates")
    stale = C.to_table(["u"], [["i"]], [[1.0]], "cvae/1")
    C.write_split(candidates, "cvae", "temporal_test", stale)
    assert main(["candidates", "--protocols", "strong,weak", *common]) == 0
    assert main(["baselines", *common]) == 0
    assert main(["evaluate", *common]) == 0

    # Each model records the protocol it was fitted on; temporal has no model.
    fitted = {}
    for folder in ("model", "protocols/strong/model", "protocols/weak/model"):
        with open(os.path.join(work, folder, "config.json")) as f:
            fitted[folder] = json.load(f)["train"]["protocol"]
    assert fitted == {
        "model": "strong", "protocols/strong/model": "strong", "protocols/weak/model": "weak"
    }
    assert not os.path.exists(os.path.join(work, "protocols", "temporal"))

    # The served export was refitted on every user, with every interaction as input, and
    # says so in its assets; strong's own model saw the train split only.
    spec = S.FeatureSpec.load(features_dir)
    with open(os.path.join(work, "export", "1", "assets.extra", "export_info.json")) as f:
        served = json.load(f)["trained_on"]
    everyone = sum(spec.splits[s].users for s in ("train", "validation", "test", "cold"))
    assert served["splits"] == ["train", "validation", "test", "cold"]
    assert (served["users"], served["targets_in_history"], served["refit_of"]) == (
        everyone, True, "strong"
    )
    with open(os.path.join(work, "protocols/strong/model", "config.json")) as f:
        assert json.load(f)["trained_on"]["splits"] == ["train"]

    # Every split is answered by its own protocol's export, cold start by the main one.
    sources = C.read_sources(candidates)
    assert {split: s["protocol"] for split, s in sources.items()} == {
        "test": "strong", "cold": "strong", "weak_test": "weak"
    }
    assert sources["test"]["export_dir"] == os.path.join(work, "protocols/strong/export", "1")
    assert sources["weak_test"]["export_dir"] == os.path.join(work, "protocols/weak/export", "1")
    assert not C.split_files(candidates, "cvae", "temporal_test")

    # The weak_test candidates are the weak export's answers, not the primary export's.
    users = list(UR.read_user_records(spec, "weak_test"))[:16]
    written = {
        user: items
        for user, items, _, _ in C.iter_rows(C.split_files(candidates, "cvae", "weak_test"))
    }
    weak_answers = _recommend(sources["weak_test"]["export_dir"], spec, users)
    strong_answers = _recommend(sources["test"]["export_dir"], spec, users)
    assert [written[u[S.USER_ID]] for u in users] == weak_answers
    assert weak_answers != strong_answers

    with open(os.path.join(work, "report", "metrics.json")) as f:
        metrics = json.load(f)
    rows = {split: set(models) for split, models in metrics["splits"].items()}
    for split in ("test", "weak_test", "cold"):
        assert {"cvae", "ease", "popularity"} <= rows[split], rows
        assert np.isfinite(metrics["splits"][split]["cvae"]["ndcg@10"])
        assert metrics["paired"][split]["cvae"]["baseline"] in ("ease", "popularity")
    assert "cvae" not in rows["temporal_test"] and "ease" in rows["temporal_test"]
    assert metrics["trained_on"] == {
        "cvae": {"test": "strong", "cold": "strong", "weak_test": "weak"}
    }
