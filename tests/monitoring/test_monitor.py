"""`recsys-cvae monitor` on real artefacts: candidates the Beam job wrote from two real exports
(one with a policy that removes the most recommended items), and request logs a real server
wrote while answering gRPC calls. The same output against itself passes; the shifted one fails
and is named."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from beam_jobs import candidates as job
from recsys_cvae import spec as S
from recsys_cvae.config import ExportConfig, MonitorConfig
from recsys_cvae.export.saved_model import export_model
from recsys_cvae.monitoring import drift as D
from recsys_cvae.monitoring.outputs import MonitorInputError, read_recommendations
from recsys_cvae.training.fit import train
from serving.server import ModelServer
from tests.builders import REPO, tiny_model_config

CLI = [sys.executable, "-m", "recsys_cvae.cli"]


@pytest.fixture(scope="module")
def exports(features_dir, tmp_path_factory) -> dict[str, str]:
    """{"plain": export base, "shifted": export base}: one trained CVAE exported twice, the
    second with its twenty most recommended cold-start items denied."""
    model_dir = str(tmp_path_factory.mktemp("model"))
    train(features_dir, model_dir, tiny_model_config(2))
    root = tmp_path_factory.mktemp("exports")
    plain = export_model(model_dir, str(root / "plain"), ExportConfig(top_k=10, verify=False))
    answered = tf.saved_model.load(plain).signatures["generate"](**attribute_inputs(features_dir))
    ids, counts = np.unique(answered["item_ids"].numpy().astype(str), return_counts=True)
    denied = [str(i) for i in ids[np.argsort(-counts)][:20]]
    policy = root / "policy.toml"
    policy.write_text(f"[deny]\nitems = {denied!r}\n")
    export_model(model_dir, str(root / "shifted"),
                 ExportConfig(top_k=10, verify=False, policy=str(policy)))
    return {"plain": str(root / "plain"), "shifted": str(root / "shifted")}


def attribute_inputs(features_dir: str, rows: int = 200) -> dict[str, tf.Tensor]:
    spec = S.FeatureSpec.load(features_dir)
    rng = np.random.default_rng(0)
    regions, devices = spec.attribute_vocabulary("region"), spec.attribute_vocabulary("device")
    return {"age": tf.constant(rng.uniform(18, 70, rows), tf.float32),
            "region": tf.constant(rng.choice(regions, rows)),
            "device": tf.constant(rng.choice(devices, rows)),
            "plan": tf.constant(["free"] * rows)}


@pytest.fixture(scope="module")
def candidates(exports, features_dir, tmp_path_factory) -> dict[str, str]:
    """Batch candidates of both exports for the test and cold users (Beam RunInference)."""
    folders = {}
    for name, base in exports.items():
        out = str(tmp_path_factory.mktemp(f"candidates-{name}"))
        job.run(["--export-dir", base, "--features-dir", features_dir, "--output-dir", out,
                 "--set", "candidates.splits=['test', 'cold', 'validation', 'train']"],
                test_pipeline=BeamTestPipeline())
        folders[name] = os.path.join(out, "cvae")
    return folders


def users_file(features_dir: str) -> str:
    inputs = S.FeatureSpec.load(features_dir).counts["inputs"]
    return next(i["path"] for i in inputs if i["role"] == "users")


def monitor(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "monitor", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"),
                          timeout=300)


@pytest.mark.slow  # a model, two exports and two Beam candidate runs (~25 s)
def test_the_same_candidates_pass_and_the_shifted_ones_fail_by_name(
        candidates, features_dir, tmp_path):
    same = monitor("--reference", candidates["plain"], "--current", candidates["plain"],
                   "--users", users_file(features_dir), "--out", str(tmp_path / "same"),
                   cwd=str(tmp_path))
    assert same.returncode == 0, same.stderr[-2000:]
    result = json.load(open(tmp_path / "same" / "monitor.json"))
    assert result["passed"] and result["measured"]["item_jsd"] == pytest.approx(0.0)
    assert {s["attribute"] for s in result["segments"]} >= {"region", "age"}
    assert os.path.exists(tmp_path / "same" / "monitor.html")

    shifted = monitor("--reference", candidates["plain"], "--current", candidates["shifted"],
                      "--users", users_file(features_dir), "--out", str(tmp_path / "shift"),
                      cwd=str(tmp_path))
    assert shifted.returncode == 3, shifted.stderr[-2000:]
    result = json.load(open(tmp_path / "shift" / "monitor.json"))
    failed = {c["name"] for c in result["checks"] if not c["passed"]}
    assert "item_jsd" in failed
    assert "monitor: FAILED item_jsd" in shifted.stdout + shifted.stderr


@pytest.mark.slow  # two real servers answering gRPC calls
def test_request_logs_from_a_real_server_are_monitored(exports, features_dir, tmp_path):
    logs = {}
    for name, base in exports.items():
        config = tmp_path / f"{name}.config"
        config.write_text(
            f'model_config_list {{ config {{ name: "recsys_cvae" base_path: "{base}" '
            'model_platform: "tensorflow" logging_config { sampling_config { sampling_rate: '
            f'1.0 }} log_collector_config {{ type: "tfrecord" filename_prefix: "{name}/log" }} '
            '} } }\n')
        server = ModelServer(model_config_file=str(config), port=0, poll_interval_s=60.0)
        port = server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                inputs = attribute_inputs(features_dir, 120)
                for start in range(0, 120, 20):  # six calls of 20 users
                    request = predict_pb2.PredictRequest()
                    request.model_spec.name, request.model_spec.signature_name = (
                        "recsys_cvae", "generate")
                    for key, value in inputs.items():
                        request.inputs[key].CopyFrom(
                            tf.make_tensor_proto(value.numpy()[start:start + 20]))
                    stub.Predict(request, timeout=30)
        finally:
            server.stop(grace_s=1.0)
        logs[name] = str(tmp_path / name)
        assert glob.glob(os.path.join(logs[name], "log.*.tfrecord"))
    reference = read_recommendations(logs["plain"])
    assert reference.kind == "request log" and reference.users == 120
    assert set(reference.attributes) == {"age", "region", "device", "plan"}
    same = D.compare(reference, read_recommendations(logs["plain"]), MonitorConfig())
    assert same["passed"]
    shifted = D.compare(reference, read_recommendations(logs["shifted"]), MonitorConfig())
    assert not shifted["passed"] and shifted["measured"]["item_jsd"] > 0.1


def test_measures_on_hand_made_sets():
    from recsys_cvae.monitoring.outputs import Recommendations

    def recs(lists):
        return Recommendations("x", "candidates", lists, [[1.0] * len(r) for r in lists], {})

    even, skewed = recs([["a", "b"], ["c", "d"]]), recs([["a", "b"], ["a", "b"]])
    assert D.gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert D.gini([0, 0, 0, 4]) == pytest.approx(0.75)
    result = D.compare(even, skewed, MonitorConfig())
    # JSD of (1/4, 1/4, 1/4, 1/4) and (1/2, 1/2, 0, 0): 1 - 0.5 * (2 * 0.5 * log2(4/3)) ...
    p, q = np.full(4, 0.25), np.array([0.5, 0.5, 0, 0])
    m = (p + q) / 2
    expected = 0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q[:2] * np.log2(q[:2] / m[:2]))
    assert result["measured"]["item_jsd"] == pytest.approx(expected)
    assert result["current"]["coverage"] == 0.5 and result["reference"]["coverage"] == 1.0
    assert not result["passed"]


def test_a_folder_with_neither_is_one_line(tmp_path):
    with pytest.raises(MonitorInputError, match="no candidates"):
        read_recommendations(str(tmp_path))
    result = monitor("--reference", str(tmp_path), "--current", str(tmp_path),
                     cwd=str(tmp_path))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "no candidates (*.parquet) or request logs" in result.stderr
