"""Request logging from --model-config-file's logging_config: sampled Predict calls as
PredictionLog TFRecords that replay as SavedModel warmup."""

from __future__ import annotations

import glob
import http.client
import json
import os
import shutil

import grpc
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2, prediction_service_pb2_grpc

from serving.servable import load_servable, warm_up
from serving.server import ModelServer
from tests.builders import predict_request


def config_file(folder, base_path: str, rate: float) -> str:
    path = os.path.join(folder, "models.config")
    with open(path, "w") as f:
        f.write(f"""model_config_list {{ config {{
  name: "recsys_cvae" base_path: "{base_path}" model_platform: "tensorflow"
  logging_config {{
    sampling_config {{ sampling_rate: {rate} }}
    log_collector_config {{ type: "tfrecord" filename_prefix: "logs/recsys_cvae" }}
  }}
}} }}
""")
    return path


def test_logged_calls_are_prediction_logs_that_replay_as_warmup(tmp_path, model_base_path):
    server = ModelServer(model_config_file=config_file(tmp_path, model_base_path, 1.0), port=0,
                         poll_interval_s=60.0)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for region in ("north", "south", "north"):
                stub.Predict(predict_request({"region": [region], "age": [3.0]}, "generate"),
                             timeout=10)
    finally:
        server.stop(grace_s=1.0)
    [log] = glob.glob(str(tmp_path / "logs" / "recsys_cvae.*.tfrecord"))
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
               for r in tf.data.TFRecordDataset(log)]
    assert len(records) == 3
    first = records[0].predict_log
    assert first.request.model_spec.signature_name == "generate"
    assert first.response.model_spec.version.value == 1
    assert tf.make_ndarray(first.response.outputs["item_ids"])[0][0] == b"i5"
    # the same file, as a version's warmup file, replays
    version = tmp_path / "replay" / "1"
    shutil.copytree(os.path.join(model_base_path, "1"), version)
    os.makedirs(version / "assets.extra", exist_ok=True)
    shutil.copy(log, version / "assets.extra" / "tf_serving_warmup_requests")
    assert warm_up(load_servable(str(version), 1), 64, 1 << 20) == 3


def test_sampling_logs_a_share_of_the_calls(tmp_path, model_base_path):
    server = ModelServer(model_config_file=config_file(tmp_path, model_base_path, 0.25), port=0,
                         poll_interval_s=60.0)
    server.request_logs["recsys_cvae"]._random.seed(0)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(200):
                stub.Predict(predict_request({"region": ["north"], "age": [3.0]}, "generate"),
                             timeout=10)
    finally:
        server.stop(grace_s=1.0)
    [log] = glob.glob(str(tmp_path / "logs" / "recsys_cvae.*.tfrecord"))
    logged = sum(1 for _ in tf.data.TFRecordDataset(log))
    assert 25 <= logged <= 75  # 50 expected


def test_rest_calls_are_logged_with_their_inputs(tmp_path, model_base_path):
    # REST decodes JSON straight to arrays; a sampled call must still log the PredictRequest
    # a gRPC client would have sent, so the log replays as warmup like any other
    server = ModelServer(model_config_file=config_file(tmp_path, model_base_path, 1.0), port=0,
                         poll_interval_s=60.0, rest_api_port=0)
    server.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
        body = {"signature_name": "generate", "instances": [{"region": "south", "age": 4.5}]}
        connection.request("POST", "/v1/models/recsys_cvae:predict", json.dumps(body))
        answer = connection.getresponse()
        assert answer.status == 200, answer.read()
        answer.read()
    finally:
        server.stop(grace_s=1.0)
    [log] = glob.glob(str(tmp_path / "logs" / "recsys_cvae.*.tfrecord"))
    [record] = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
                for r in tf.data.TFRecordDataset(log)]
    request = record.predict_log.request
    assert request.model_spec.signature_name == "generate"
    assert tf.make_ndarray(request.inputs["region"]).tolist() == [b"south"]
    assert tf.make_ndarray(request.inputs["age"]).tolist() == [4.5]
    version = tmp_path / "replay" / "1"
    shutil.copytree(os.path.join(model_base_path, "1"), version)
    os.makedirs(version / "assets.extra", exist_ok=True)
    shutil.copy(log, version / "assets.extra" / "tf_serving_warmup_requests")
    assert warm_up(load_servable(str(version), 1), 64, 1 << 20) == 1
