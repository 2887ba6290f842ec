"""Training: β annealing, the validation callback, files written, reload, strategies, resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from recsys_cvae.config import Config, ModelConfig
from recsys_cvae.model.cvae import build_model
from recsys_cvae.model.model_dir import load_trained_model
from recsys_cvae.spec import TEST, TRAIN, VALIDATION, FeatureSpec
from recsys_cvae.training.callbacks import BetaAnnealing, RankingValidation
from recsys_cvae.training.dataset import make_dataset
from recsys_cvae.training.fit import train
from recsys_cvae.training.strategy import choose_strategy
from tests.builders import (
    REPO,
    RecordWeights,
    popularity_ndcg_at_10,
    small_config,
    write_tiny_features,
)


class RecordLogits(tf.keras.callbacks.Callback):
    """Keeps the model's recommend logits for one fixed batch after every epoch."""

    def __init__(self, batch):
        super().__init__()
        self.batch = batch
        self.logits = []

    def on_epoch_end(self, epoch, logs=None):
        self.logits.append(self.model.recommend_logits(self.batch).numpy())


@pytest.fixture(scope="module")
def trained(features_dir, tmp_path_factory):
    """Five epochs on the synthetic fixture, default strategy."""
    spec = FeatureSpec.load(features_dir)
    batch = next(iter(make_dataset(spec, VALIDATION, batch_size=8)))
    recorder = RecordLogits(batch)
    model_dir = str(tmp_path_factory.mktemp("model"))
    result = train(features_dir, model_dir, small_config(5, strategy="default"), [recorder])
    return {"result": result, "model_dir": model_dir, "recorder": recorder, "batch": batch}


def test_beta_rises_linearly_with_the_optimizer_step(tmp_path):
    annealing = BetaAnnealing(beta_cap=0.2, anneal_steps=4)
    assert [annealing.beta_at(step) for step in (0, 2, 4, 9)] == pytest.approx([0, 0.1, 0.2, 0.2])

    spec = write_tiny_features(str(tmp_path))  # 3 users
    model = build_model(spec, ModelConfig(latent_dim=2, hidden_dims=[4], condition_dim=2))
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
    assert float(model.beta.numpy()) == 0.0
    history = model.fit(
        make_dataset(spec, TRAIN, batch_size=1), epochs=1, callbacks=[annealing], verbose=0
    )
    # The 3 steps ran with β at steps 0, 1, 2; β is now ready for step 3: 0.2 · 3/4.
    assert int(model.train_steps.numpy()) == 3
    assert float(model.beta.numpy()) == pytest.approx(0.15)
    # The β tracker averages what the steps saw: (0 + 0.05 + 0.1) / 3.
    assert history.history["beta"][0] == pytest.approx(0.05)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="train.strategy must be one of"):
        choose_strategy("tpu")


def test_collective_settings_become_communication_options():
    from recsys_cvae.training.strategy import communication_options

    options = communication_options("ring", 32 << 20)
    assert options.bytes_per_pack == 32 << 20
    assert options.implementation == tf.distribute.experimental.CommunicationImplementation.RING
    with pytest.raises(ValueError, match="train.collective must be one of"):
        communication_options("mpi", 0)


def test_train_writes_config_best_weights_and_metrics(trained):
    result, model_dir = trained["result"], trained["model_dir"]
    assert result["epochs_run"] == 5 and 1 <= result["best_epoch"] <= 5
    assert result["replicas"] == 1 and result["strategy"] == "default"
    assert 0.0 < result["ndcg@10"] <= 1.0 and 0.0 < result["recall@20"] <= 1.0

    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    # The resolved config: the test's settings, with the data-size rules applied.
    expected = {**small_config(5).model.__dict__, "prior_reconstruction_fraction": 1.0}
    assert os.path.isdir(config["features_dir"]) and config["model"] == expected
    assert os.path.exists(os.path.join(model_dir, "best", "weights.index"))
    assert os.listdir(os.path.join(model_dir, "logs"))

    with open(os.path.join(model_dir, "training_metrics.json")) as f:
        metrics = json.load(f)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5]
    best = metrics["history"][result["best_epoch"] - 1]
    assert best["val_ndcg@10"] == pytest.approx(result["ndcg@10"])
    assert best["val_ndcg@10"] == max(h["val_ndcg@10"] for h in metrics["history"])
    # β rose over training and the losses were recorded.
    assert metrics["history"][0]["beta"] < metrics["history"][-1]["beta"] <= Config().train.beta_cap
    assert {"loss", "reconstruction", "kl", "val_loss"} <= set(metrics["history"][0])


def test_load_trained_model_restores_the_best_epoch_exactly(trained):
    model = load_trained_model(trained["model_dir"])
    best_epoch = trained["result"]["best_epoch"]
    expected = trained["recorder"].logits[best_epoch - 1]
    np.testing.assert_array_equal(model.recommend_logits(trained["batch"]).numpy(), expected)
    # Recomputing the validation metrics with the reloaded model gives the recorded best.
    validation = RankingValidation(make_dataset(model.spec, VALIDATION, 16), "", "", patience=0)
    validation.set_model(model)
    assert validation.evaluate()["ndcg@10"] == pytest.approx(trained["result"]["ndcg@10"])


def test_the_cvae_beats_popularity(trained):
    # Synthetic tastes depend on attributes, which popularity ignores. The test split was
    # not used to pick the epoch, so it checks that the margin is not selection luck.
    model = load_trained_model(trained["model_dir"])
    validation = popularity_ndcg_at_10(model.spec, VALIDATION)
    assert trained["result"]["ndcg@10"] > validation + 0.05
    test = RankingValidation(make_dataset(model.spec, TEST, 64), "", "", patience=0)
    test.set_model(model)
    assert test.evaluate()["ndcg@10"] > popularity_ndcg_at_10(model.spec, TEST) + 0.05


def test_an_interrupted_run_resumes_from_the_backup(features_dir, tmp_path):
    class Crash(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("simulated crash after epoch 2")

    model_dir = str(tmp_path / "model")
    config = small_config(3, strategy="default")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(features_dir, model_dir, config, [Crash()])
    assert os.listdir(os.path.join(model_dir, "backup", "chief"))

    result = train(features_dir, model_dir, config)
    # Epochs 1-2 come from the first run; only epoch 3 ran again.
    assert result["epochs_run"] == 3
    with open(os.path.join(model_dir, "training_metrics.json")) as f:
        history = json.load(f)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert not os.path.exists(os.path.join(model_dir, "backup", "chief"))


# Mirrored and default runs see the same global batches and seeds, but each replica draws
# its own dropout masks and z samples, so the curves agree in distribution, not bit for bit:
# per-epoch mean training loss within 3%.
MIRRORED_LOSS_RTOL = 0.03


def test_mirrored_on_two_logical_cpus_reproduces_the_default_loss_curve(features_dir, tmp_path):
    # Logical devices must be configured before TensorFlow initialises: a fresh process.
    script = textwrap.dedent(
        f"""
        import json
        from tests.builders import small_config
        from recsys_cvae.training.fit import train
        runs = {{}}
        for name in ("mirrored", "default"):
            config = small_config(2, strategy=name, num_logical_cpus=2, batch_size=32)
            result = train({features_dir!r}, {str(tmp_path)!r} + "/" + name, config)
            with open({str(tmp_path)!r} + "/" + name + "/training_metrics.json") as f:
                result["losses"] = [h["loss"] for h in json.load(f)["history"]]
            runs[name] = result
        print(json.dumps(runs))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    mirrored, default = runs["mirrored"], runs["default"]
    assert mirrored["strategy"] == "mirrored" and mirrored["replicas"] == 2
    assert default["replicas"] == 1 and mirrored["epochs_run"] == 2
    np.testing.assert_allclose(mirrored["losses"], default["losses"], rtol=MIRRORED_LOSS_RTOL)
    # The loss fell, so the comparison is between two runs that learnt something.
    assert mirrored["losses"][-1] < mirrored["losses"][0]
    assert os.path.exists(tmp_path / "mirrored" / "best" / "weights.index")


def test_mixed_precision_training_runs_on_cpu_and_restores_the_policy(features_dir, tmp_path):
    result = train(features_dir, str(tmp_path), small_config(1, mixed_precision=True))
    assert tf.keras.mixed_precision.global_policy().name == "float32"
    # The saved float32 variables load into an ordinary float32 model, which ranks the
    # validation users as the float16 run reported (to float16's precision).
    model = load_trained_model(str(tmp_path))
    assert model.decoder.hidden[0].compute_dtype == "float32"
    spec = FeatureSpec.load(features_dir)
    validation = RankingValidation(make_dataset(spec, VALIDATION, 64), "", "", patience=0)
    validation.set_model(model)
    assert validation.evaluate()["ndcg@10"] == pytest.approx(result["ndcg@10"], abs=0.05)


class ScriptedValidation(RankingValidation):
    """RankingValidation whose per-epoch NDCG@10 comes from a list instead of a dataset."""

    def __init__(self, scores, best_weights, metrics_path, patience):
        super().__init__(None, best_weights, metrics_path, patience)
        self.scores = list(scores)
        self.saved_at = []

    def on_epoch_end(self, epoch, logs=None):
        self.dataset = "scripted"  # anything not None: evaluate() is called
        super().on_epoch_end(epoch, logs)

    def evaluate(self):
        return {"ndcg@10": self.scores.pop(0)}


def test_early_stopping_stops_after_patience_and_keeps_the_best_epoch(tmp_path):
    spec = write_tiny_features(str(tmp_path / "features"))
    model = build_model(spec, ModelConfig(latent_dim=2, hidden_dims=[4], condition_dim=2))
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2))
    weights = str(tmp_path / "best" / "weights")

    class RecordKernel(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.kernels = []

        def on_epoch_end(self, epoch, logs=None):
            self.kernels.append(self.model.decoder.logits.kernel.numpy().copy())

    scores = [0.1, 0.3, 0.2, 0.25, 0.29, 0.9]
    validation = ScriptedValidation(scores, weights, str(tmp_path / "m"), patience=3)
    kernels = RecordKernel()
    model.fit(
        make_dataset(spec, TRAIN, batch_size=1),
        epochs=6,
        callbacks=[validation, kernels],
        verbose=0,
    )
    # Best at epoch 2, then 3 epochs without improvement: stopped after epoch 5.
    assert len(kernels.kernels) == 5 and validation.best_epoch == 2
    restored = build_model(spec, ModelConfig(latent_dim=2, hidden_dims=[4], condition_dim=2))
    restored.load_weights(weights).expect_partial()
    np.testing.assert_array_equal(restored.decoder.logits.kernel.numpy(), kernels.kernels[1])


def test_tensorboard_has_loss_terms_beta_and_validation_metrics(trained):
    tags = {}
    logs = os.path.join(trained["model_dir"], "logs")
    for run in ("train", "validation"):
        tags[run] = set()
        for name in os.listdir(os.path.join(logs, run)):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(logs, run, name)):
                tags[run].update(value.tag for value in event.summary.value)
    assert {"epoch_loss", "epoch_reconstruction", "epoch_kl", "epoch_beta"} <= tags["train"]
    assert {"epoch_ndcg@10", "epoch_recall@20", "epoch_loss"} <= tags["validation"]


KILL_SCRIPT = """
import os, sys, time, json
import tensorflow as tf
from tests.builders import small_config
from recsys_cvae.training.fit import train

features_dir, model_dir, marker = sys.argv[1:4]


class PauseMidEpoch(tf.keras.callbacks.Callback):
    # On the first run only: in epoch 3, after a few steps, signal and wait to be killed.
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 2 and batch == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(600)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


config = small_config(5, strategy="default", batch_size=16)
callbacks = [PauseMidEpoch()] if marker != "-" else []
print(json.dumps(train(features_dir, model_dir, config, callbacks)))
"""


@pytest.mark.slow
def test_sigkill_mid_epoch_then_the_same_command_resumes_and_matches(features_dir, tmp_path):
    import signal
    import time

    def command(model_dir, marker):
        return [sys.executable, "-c", KILL_SCRIPT, features_dir, str(model_dir), str(marker)]

    marker = tmp_path / "paused"
    killed = subprocess.Popen(command(tmp_path / "model", marker), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not marker.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the training process never reached epoch 3"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    with open(tmp_path / "model" / "training_metrics.json") as f:
        assert [h["epoch"] for h in json.load(f)["history"]] == [1, 2]

    def run(model_dir, marker):
        done = subprocess.run(command(model_dir, marker), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    resumed = run(tmp_path / "model", marker)  # the same command; the marker now exists
    uninterrupted = run(tmp_path / "fresh", "-")
    with open(tmp_path / "model" / "training_metrics.json") as f:
        history = json.load(f)["history"]
    # Epochs 1-2 came from the killed run; 3-5 ran again from the epoch-2 checkpoint.
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5] and resumed["epochs_run"] == 5
    # The resumed run draws different dropout/z noise after the restart: NDCG@10 within 0.05.
    assert resumed["ndcg@10"] == pytest.approx(uninterrupted["ndcg@10"], abs=0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_strategy_trains_two_local_workers_in_step(features_dir, tmp_path):
    """Two workers exchange gradients the default way (bfloat16, the item-item gradient as
    its gathered factors) and learn what one worker learns on the same global batches."""
    workers = [f"localhost:{free_port()}", f"localhost:{free_port()}"]
    script = textwrap.dedent(
        """
        import json, os, sys
        from tests.builders import small_config
        from recsys_cvae.config import ModelConfig
        from recsys_cvae.training.fit import train
        features_dir, model_dir, strategy = sys.argv[1:]
        config = small_config(3, strategy=strategy, batch_size=32)
        # the default EASE blend and attribute lift after the fit, run by every worker
        config.model.linear_blend_lambdas = ModelConfig().linear_blend_lambdas
        config.model.attribute_lift_weights = ModelConfig().attribute_lift_weights
        result = train(features_dir, model_dir, config)
        task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
        if task.get("index", 0) == 0:  # the chief's (or the single worker's) history
            with open(model_dir + "/training_metrics.json") as f:
                result["losses"] = [h["loss"] for h in json.load(f)["history"]]
        print(json.dumps(result))
        """
    )

    def start(model_dir, strategy, env):
        return subprocess.Popen([sys.executable, "-c", script, features_dir, model_dir, strategy],
                                cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip

    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config)}
        processes.append(start(str(tmp_path / "two"), "auto", env))
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    single = start(str(tmp_path / "one"), "default", dict(os.environ))
    stdout, stderr = single.communicate(timeout=300)
    assert single.returncode == 0, stderr[-2000:]
    one = json.loads(stdout.strip().splitlines()[-1])
    # `auto` saw two workers; gradients were all-reduced, so both ended with the same model.
    assert [r["strategy"] for r in results] == ["multi_worker", "multi_worker"]
    assert results[0]["replicas"] == 2 and results[0]["ndcg@10"] == results[1]["ndcg@10"]
    assert results[0]["linear_blend"] == results[1]["linear_blend"] is not None
    assert results[0]["attribute_lift"] == results[1]["attribute_lift"]
    # The same loss curve as one worker, within the mirrored test's tolerance: each replica
    # draws its own dropout masks and z samples, and bfloat16 rounds the summed gradients.
    np.testing.assert_allclose(results[0]["losses"], one["losses"], rtol=MIRRORED_LOSS_RTOL)
    assert results[0]["losses"][-1] < results[0]["losses"][0]
    # Only the chief (worker 0) writes into the model directory.
    assert sorted(os.listdir(tmp_path / "two")) == [
        "backup",
        "best",
        "config.json",
        "logs",
        "training_metrics.json",
    ]


def test_ease_initialisation_matches_the_ease_baseline(features_dir):
    from recsys_cvae.baselines.linear import ease_weights
    from recsys_cvae.baselines.split_data import load_split
    from recsys_cvae.training.fit import FitData, ease_matrix

    spec = FeatureSpec.load(features_dir)
    model = build_model(spec, ModelConfig(linear_branch_max_items=spec.num_items))
    weights = ease_matrix(model, spec, FitData((TRAIN,), None), l2=50.0, batch_size=64)
    index = {item: i for i, item in enumerate(spec.item_vocabulary())}
    expected = ease_weights(load_split(spec, TRAIN, index).history, 50.0)
    np.testing.assert_allclose(weights, expected, atol=1e-5)
    assert np.all(np.diag(weights) == 0)


def test_data_size_rules_resolve_only_auto_fields(features_dir):
    from recsys_cvae.training.fit import SMALL_DATA_USERS, adapt_to_data

    spec = FeatureSpec.load(features_dir)
    config = Config()
    config.train.batch_size = 0
    assert spec.splits[TRAIN].users <= SMALL_DATA_USERS
    assert adapt_to_data(config, spec).train.batch_size == 128
    assert adapt_to_data(config, spec).model.prior_reconstruction_fraction == 1.0
    assert config.train.batch_size == 0  # the caller's config is not modified
    config.train.batch_size = 7
    assert adapt_to_data(config, spec).train.batch_size == 7


def test_linear_blend_adds_validated_ease_to_the_trained_branch(features_dir, tmp_path):
    """After training, B_best + α · EASE(λ, p) of every training interaction is what
    `load_trained_model` returns (chosen with the fold-in slice held out), and it scores
    the validation NDCG@10 the blend reported."""
    from recsys_cvae.model.ease import ease_from_gram
    from recsys_cvae.training.ease_blend import gram_matrix

    config = small_config(2, strategy="default")
    config.model.linear_blend_lambdas = [20.0]
    config.model.linear_blend_weights = [5.0]
    config.model.linear_blend_dropouts = [0.5]
    recorder = RecordWeights()
    result = train(features_dir, str(tmp_path), config, [recorder])
    blend = result["linear_blend"]
    assert blend["alpha"] == 5.0 and blend["l2"] == 20.0 and blend["dropout"] == 0.5
    assert blend["blend_ndcg@10"] > blend["blend_ndcg@10_before"]

    model = load_trained_model(str(tmp_path))
    spec = FeatureSpec.load(features_dir)
    trained_branch = recorder.branches[result["best_epoch"] - 1]
    closed_form = ease_from_gram(gram_matrix(model, spec, TRAIN, 64), 20.0, 0.5)
    np.testing.assert_allclose(
        model.item_item.weights_matrix.numpy(), trained_branch + 5.0 * closed_form, atol=1e-4
    )
    validation = RankingValidation(make_dataset(spec, VALIDATION, 64), "", "", patience=0)
    validation.set_model(model)
    assert validation.evaluate()["ndcg@10"] == pytest.approx(blend["validation_ndcg@10"])
    with open(tmp_path / "training_metrics.json") as f:
        assert json.load(f)["linear_blend"]["alpha"] == 5.0


def test_adam_compiles_its_update_on_cpu_and_matches_keras_adam():
    from recsys_cvae.training.fit import adam

    # Keras compiles the update with XLA only when it sees a GPU; `adam` does it on CPU too.
    ours, keras = adam(0.1), tf.keras.optimizers.Adam(0.1)
    assert ours.jit_compile and not keras.jit_compile
    start = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], np.float32)
    variables = [tf.Variable(start), tf.Variable(start)]
    for step in range(3):
        gradient = tf.constant(start * (step + 1) - 0.3 * step)
        ours.apply_gradients([(gradient, variables[0])])
        keras.apply_gradients([(gradient, variables[1])])
    np.testing.assert_allclose(variables[0].numpy(), variables[1].numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(variables[0].numpy(), start)
