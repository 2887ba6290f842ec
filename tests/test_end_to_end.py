"""The whole flow from the shell: synthetic raw data -> `recsys-cvae pipeline` -> checks.

The export is loaded in a fresh Python process that never imports recsys_cvae, as TF Serving
would load it, and the report must show the CVAE ahead of popularity: the synthetic users'
tastes depend on their attributes and history, which popularity ignores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.builders import REPO

# The console script a user runs (`pip install` puts it beside the interpreter).
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "recsys-cvae")
CLI = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "recsys_cvae.cli"]


def _run(args: list[str], timeout_s: float, cwd: str = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> tuple[str, subprocess.CompletedProcess]:
    # As a user runs it: from their own (empty) folder outside the repository, with a
    # relative workdir, so every path a stage hands a subprocess must be resolved.
    user_folder = str(tmp_path_factory.mktemp("user-folder"))
    assert not user_folder.startswith(REPO)
    workdir = os.path.join(user_folder, "runs", "e2e")
    result = _run(
        [
            *CLI,
            "pipeline",
            "--workdir",
            os.path.join("runs", "e2e"),
            "--synthetic-users",
            "800",
            "--synthetic-items",
            "150",
            "--set",
            "train.epochs=15",
            "--set",
            "train.verbose=0",
        ],
        timeout_s=900,
        cwd=user_folder,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_pipeline_prints_durations_and_metrics(pipeline_run):
    workdir, result = pipeline_run
    assert "Stage durations" in result.stdout
    for stage in ("features", "train", "export", "candidates", "baselines", "evaluate",
                  "model card"):
        assert f"| {stage} |" in result.stdout
    assert "Metrics on the test users" in result.stdout
    html = os.path.join(workdir, "report", "report.html")
    assert f"Report: {html}" in result.stdout and os.path.exists(html)


def test_cvae_beats_popularity_on_held_out_users(pipeline_run):
    workdir, _ = pipeline_run
    with open(os.path.join(workdir, "report", "metrics.json")) as f:
        metrics = json.load(f)
    test = metrics["splits"]["test"]
    cvae = next(name for name in test if name.startswith("cvae"))
    assert test[cvae]["ndcg@10"] > test["popularity"]["ndcg@10"], test
    cold = metrics["splits"]["cold"]
    assert cold[cvae]["ndcg@10"] > cold["popularity"]["ndcg@10"], cold
    # One CVAE per protocol: every protocol's test split has a CVAE row.
    assert all(cvae in metrics["splits"][split] for split in metrics["protocols"].values())


def test_the_served_export_carries_its_evaluated_provenance_and_model_card(pipeline_run):
    workdir, result = pipeline_run
    assets = os.path.join(workdir, "export", "1", "assets.extra")
    with open(os.path.join(assets, "provenance.json")) as f:
        provenance = json.load(f)
    with open(os.path.join(workdir, "report", "metrics.json")) as f:
        metrics = json.load(f)
    assert provenance["trained_on"]["refit_of"] == "strong"
    assert set(provenance["evaluation"]) == set(metrics["protocols"])
    strong = provenance["evaluation"]["strong"]
    assert strong["test"]["cvae"]["ndcg@10"] == metrics["splits"]["test"]["cvae"]["ndcg@10"]
    assert strong["validation"]["ndcg@10"] > 0
    card = os.path.join(assets, "model_card.html")
    assert f"Model card of the served export: {card}" in result.stdout
    with open(os.path.join(assets, "model_card.md")) as f:
        text = f.read()
    assert "## Per-group quality" in text and "Not evaluated yet" not in text


def test_export_honours_the_signature_contract_in_a_fresh_process(pipeline_run):
    workdir, _ = pipeline_run
    export_base = os.path.join(workdir, "export")
    script = textwrap.dedent(
        f"""
        import json, sys
        import tensorflow as tf
        loaded = tf.saved_model.load({os.path.join(export_base, "1")!r})
        assert "recsys_cvae" not in sys.modules
        spec = json.load(open({os.path.join(workdir, "features", "feature_spec.json")!r}))
        attrs = {{a["name"]: a["kind"] for a in spec["attributes"]}}
        def attr_inputs(batch):
            return {{name: tf.constant([""] * batch) if kind == "categorical"
                     else tf.constant([float("nan")] * batch) for name, kind in attrs.items()}}
        sigs = loaded.signatures
        assert set(sigs) >= {{"recommend", "generate", "encode", "serving_default"}}, list(sigs)
        vocab = {os.path.join(workdir, "features", "vocab", "items.txt")!r}
        items = [line.rstrip("\\n") for line in open(vocab)]
        history = [[items[0], items[1], "no-such-item", ""], [items[2], "", "", ""]]
        out = sigs["recommend"](item_ids=tf.constant(history), **attr_inputs(2))
        assert set(out) == {{"item_ids", "scores"}}, set(out)
        ids = out["item_ids"].numpy().astype(str)
        scores = out["scores"].numpy()
        assert ids.shape == scores.shape and ids.shape[0] == 2
        assert (scores[:, :-1] >= scores[:, 1:]).all(), "best first"
        assert not {{items[0], items[1]}} & set(ids[0]), "history returned"
        assert items[2] not in set(ids[1])
        gen = sigs["generate"](**attr_inputs(3))
        assert gen["item_ids"].shape[0] == 3
        enc = sigs["encode"](item_ids=tf.constant(history), **attr_inputs(2))
        assert set(enc) == {{"z_mean", "z_log_var"}}
        print("contract ok", ids.shape)
        """
    )
    result = _run([sys.executable, "-c", script], timeout_s=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "contract ok" in result.stdout


def test_bad_data_dir_is_one_line_error(tmp_path):
    result = _run(
        [*CLI, "features", "--data-dir", str(tmp_path / "missing"), "--workdir", str(tmp_path)],
        timeout_s=300,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if "error" in line]
    assert lines and "missing" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
