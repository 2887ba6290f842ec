"""The embedded server through the official TF Serving stubs, on 127.0.0.1 and a free port.

Expected values come from the tiny model in conftest.py (version 1: base scores 5, 4, 3, 2, 1
for i1..i5, +10 on i5 for "north", +10 on i4 for "south", top 3, history masked).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from serving.server import ModelServer
from tests.builders import (
    NORTH_EMPTY,
    REPO,
    V1_SCORES,
    V2_SCORES,
    outputs_of,
    predict_request,
    save_version,
)


@pytest.fixture(scope="module")
def channel(target):
    with grpc.insecure_channel(target) as channel:
        yield channel


@pytest.fixture(scope="module")
def predict_stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def error_code(call, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=10)
    return raised.value.code()


def test_recommend_ranks_by_score_and_masks_history(predict_stub):
    request = predict_request({
        "item_ids": [["", ""], ["i1", ""]], "region": ["north", ""], "age": [30.0, np.nan],
    })
    response = predict_stub.Predict(request, timeout=10)
    out = outputs_of(response)
    # user 0: north adds 10 to i5 -> i5 (1 + 10), i1 (5), i2 (4); user 1: i1 seen -> i2, i3, i4
    assert out["item_ids"].tolist() == [[b"i5", b"i1", b"i2"], [b"i2", b"i3", b"i4"]]
    np.testing.assert_allclose(out["scores"], [[11, 5, 4], [4, 3, 2]])
    assert response.model_spec.name == "recsys_cvae"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "recommend"
    # typed fields, as TF Serving writes them, for clients that read them directly
    assert list(response.outputs["scores"].float_val) == [11, 5, 4, 4, 3, 2]
    assert response.outputs["item_ids"].string_val[0] == b"i5"


def test_empty_signature_name_means_serving_default(predict_stub):
    response = predict_stub.Predict(predict_request(NORTH_EMPTY, signature=""), timeout=10)
    assert response.model_spec.signature_name == "serving_default"
    assert outputs_of(response)["item_ids"].tolist() == [[b"i5", b"i1", b"i2"]]


def test_generate_and_encode(predict_stub):
    generated = outputs_of(predict_stub.Predict(
        predict_request({"region": ["south"], "age": [20.0]}, signature="generate"), timeout=10))
    # south adds 10 to i4: i4 (2 + 10), i1 (5), i2 (4)
    assert generated["item_ids"].tolist() == [[b"i4", b"i1", b"i2"]]
    encoded = outputs_of(predict_stub.Predict(predict_request(
        {"item_ids": [["i1", "i9", ""], ["", "", ""]], "region": ["", ""], "age": [41.0, np.nan]},
        signature="encode"), timeout=10))
    # z_mean = [age (NaN -> 0), known history items (i9 is unknown)]
    np.testing.assert_allclose(encoded["z_mean"], [[41, 1], [0, 0]])
    np.testing.assert_allclose(encoded["z_log_var"], np.zeros((2, 2)))


def test_empty_batch_is_answered_with_empty_outputs(predict_stub):
    request = predict_request({"item_ids": np.zeros((0, 0), dtype=object),
                            "region": np.zeros((0,), dtype=object),
                            "age": np.zeros((0,), dtype=np.float32)})
    assert outputs_of(predict_stub.Predict(request, timeout=10))["scores"].shape == (0, 3)


def test_output_filter_returns_only_the_named_outputs(predict_stub):
    request = predict_request(NORTH_EMPTY, output_filter=["scores"])
    response = predict_stub.Predict(request, timeout=10)
    assert list(response.outputs) == ["scores"]
    bad = predict_request(NORTH_EMPTY, output_filter=["logits"])
    assert error_code(predict_stub.Predict, bad) == grpc.StatusCode.INVALID_ARGUMENT
    twice = predict_request(NORTH_EMPTY, output_filter=["scores", "scores"])
    assert error_code(predict_stub.Predict, twice) == grpc.StatusCode.INVALID_ARGUMENT


def test_version_and_label_select_the_served_version(predict_stub):
    for spec in ({"version": 1}, {"label": "stable"}):
        request = predict_request(NORTH_EMPTY, **spec)
        assert predict_stub.Predict(request, timeout=10).model_spec.version.value == 1


def test_metadata_packs_the_signature_def_map(predict_stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "recsys_cvae"
    response = predict_stub.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    signatures = signature_map.signature_def
    assert {"serving_default", "recommend", "generate", "encode"} <= set(signatures)
    assert set(signatures["recommend"].inputs) == {"item_ids", "region", "age"}
    assert signatures["recommend"].inputs["age"].dtype == tf.float32.as_datatype_enum
    assert set(signatures["encode"].outputs) == {"z_mean", "z_log_var"}
    assert signatures["generate"].method_name == "tensorflow/serving/predict"

    no_field = get_model_metadata_pb2.GetModelMetadataRequest()
    no_field.model_spec.name = "recsys_cvae"
    assert error_code(predict_stub.GetModelMetadata, no_field) == grpc.StatusCode.INVALID_ARGUMENT
    other_field = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["graph"])
    other_field.model_spec.name = "recsys_cvae"
    assert error_code(predict_stub.GetModelMetadata, other_field) == (
        grpc.StatusCode.INVALID_ARGUMENT)


def status_request(name: str = "recsys_cvae", version: int | None = None):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    return request


def test_model_status_and_health(channel):
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    response = models.GetModelStatus(status_request(), timeout=10)
    [entry] = response.model_version_status
    assert (entry.version, entry.state, entry.status.error_code) == (
        1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)
    assert error_code(models.GetModelStatus, status_request(version=7)) == (
        grpc.StatusCode.NOT_FOUND)
    assert error_code(models.GetModelStatus, status_request("other")) == grpc.StatusCode.NOT_FOUND

    health_stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService"):
        answer = health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("request_kwargs, inputs, code", [
    ({"name": "other"}, NORTH_EMPTY, grpc.StatusCode.NOT_FOUND),
    ({"version": 7}, NORTH_EMPTY, grpc.StatusCode.NOT_FOUND),
    ({"label": "canary"}, NORTH_EMPTY, grpc.StatusCode.INVALID_ARGUMENT),
    # TF Serving answers an unknown signature key with FAILED_PRECONDITION (predict_util.cc)
    ({"signature": "classify"}, NORTH_EMPTY, grpc.StatusCode.FAILED_PRECONDITION),
    ({}, {"item_ids": [[""]], "region": ["north"]}, grpc.StatusCode.INVALID_ARGUMENT),
    ({}, {**NORTH_EMPTY, "gender": ["f"]}, grpc.StatusCode.INVALID_ARGUMENT),
    ({}, {**NORTH_EMPTY, "item_ids": ["i1"]}, grpc.StatusCode.INVALID_ARGUMENT),  # rank 1
    ({}, {**NORTH_EMPTY, "region": [["north"]]}, grpc.StatusCode.INVALID_ARGUMENT),  # rank 2
    ({}, {**NORTH_EMPTY, "region": ["north", "south"]}, grpc.StatusCode.INVALID_ARGUMENT),
    ({}, {"item_ids": [[""]] * 9, "region": ["a"] * 9, "age": [1.0] * 9},  # cap is 8
     grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_tf_serving_status_codes(predict_stub, request_kwargs, inputs, code):
    assert error_code(predict_stub.Predict, predict_request(inputs, **request_kwargs)) == code


def test_wrong_dtype_and_missing_model_spec_are_invalid(predict_stub):
    request = predict_request(NORTH_EMPTY)
    request.inputs["age"].CopyFrom(tf.make_tensor_proto(["thirty"]))
    assert error_code(predict_stub.Predict, request) == grpc.StatusCode.INVALID_ARGUMENT
    request = predict_request(NORTH_EMPTY)
    request.ClearField("model_spec")
    assert error_code(predict_stub.Predict, request) == grpc.StatusCode.INVALID_ARGUMENT


def test_message_over_the_size_cap_is_resource_exhausted(predict_stub):
    huge = predict_request({**NORTH_EMPTY, "region": ["x" * (17 * 1024 * 1024)]})
    assert error_code(predict_stub.Predict, huge) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_classify_regress_multi_inference_are_unimplemented(predict_stub):
    for call, request in [
        (predict_stub.Classify, classification_pb2.ClassificationRequest()),
        (predict_stub.Regress, regression_pb2.RegressionRequest()),
        (predict_stub.MultiInference, inference_pb2.MultiInferenceRequest()),
    ]:
        assert error_code(call, request) == grpc.StatusCode.UNIMPLEMENTED


SIGNATURE_INPUTS = {  # the signatures' inputs: name -> (dtype, rank)
    "recommend": {"item_ids": (tf.string, 2), "region": (tf.string, 1), "age": (tf.float32, 1)},
    "generate": {"region": (tf.string, 1), "age": (tf.float32, 1)},
}


def random_tensor(rng: random.Random, dtype: tf.DType, rank: int, batch: int):
    """A TensorProto that is often right and otherwise wrong in some random way."""
    if rng.random() < 0.1:
        dtype = rng.choice([tf.string, tf.float32, tf.int64, tf.float64, tf.bool])
    if rng.random() < 0.1:
        rank = rng.choice([0, 1, 2, 3])
    shape = [rng.choice([0, 1, 2, 3, 9]) for _ in range(rank)]
    if shape and rng.random() < 0.9:
        shape[0] = batch
    size = int(np.prod(shape)) if shape else 1
    if dtype == tf.string:
        values = np.array([rng.choice([b"", b"i1", b"north", b"\xff" * 5000])] * size, dtype=object)
    else:
        fill = rng.choice([0, 1, np.nan] if dtype.is_floating else [0, 1])
        values = np.full(size, fill, dtype=dtype.as_numpy_dtype)
    proto = tf.make_tensor_proto(values.reshape(shape), dtype=dtype)
    mutation = rng.random()
    if mutation < 0.02:
        proto.tensor_shape.dim.add(size=10**9)  # claims a billion values
    elif mutation < 0.04:
        proto.dtype = 999  # not a dtype
    elif mutation < 0.06:
        proto.tensor_shape.dim.add(size=-3)
    elif mutation < 0.08:
        proto.tensor_content = b"\x01\x02\x03"  # bytes that fit no shape
    elif mutation < 0.1:
        proto.tensor_shape.unknown_rank = True
    return proto


def random_request(rng: random.Random) -> predict_pb2.PredictRequest:
    """Mostly the right model, signature and input names, with random tensors."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = rng.choice(["recsys_cvae"] * 19 + ["x"])
    signature = rng.choice(["recommend", "generate"])
    request.model_spec.signature_name = signature
    inputs = dict(SIGNATURE_INPUTS[signature])
    if rng.random() < 0.15:
        inputs.pop(rng.choice(sorted(inputs)))
    if rng.random() < 0.15:
        inputs["gender"] = (tf.string, 1)
    batch = rng.choice([0, 1, 2, 3, 9])  # 9 is over the cap of 8
    for name, (dtype, rank) in inputs.items():
        request.inputs[name].CopyFrom(random_tensor(rng, dtype, rank, batch))
    if rng.random() < 0.1:
        request.output_filter.append(rng.choice(["scores", "item_ids", "z_mean"]))
    return request


def test_fuzzed_requests_never_crash_the_server(predict_stub):
    rng = random.Random(7)
    allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
    answered_ok = 0
    for _ in range(1000):
        try:
            predict_stub.Predict(random_request(rng), timeout=10)
            answered_ok += 1
        except grpc.RpcError as error:
            assert error.code() in allowed, (error.code(), error.details())
    assert 0 < answered_ok < 1000  # the fuzz reached the model and produced bad requests
    response = predict_stub.Predict(predict_request(NORTH_EMPTY), timeout=10)
    assert outputs_of(response)["item_ids"].tolist() == [[b"i5", b"i1", b"i2"]]


def write_warmup(version_dir: str, inputs: dict) -> None:
    """assets.extra/tf_serving_warmup_requests with one PredictLog, as the export writes."""
    os.makedirs(os.path.join(version_dir, "assets.extra"), exist_ok=True)
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.CopyFrom(predict_request(inputs))
    path = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(log.SerializeToString())


AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


def version_states(models) -> dict[int, int]:
    response = models.GetModelStatus(status_request(), timeout=10)
    return {entry.version: entry.state for entry in response.model_version_status}


def wait_for(condition, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_new_versions_are_picked_up_and_broken_ones_reported(tmp_path, model_base_path):
    base = str(tmp_path / "base")
    shutil.copytree(model_base_path, base)
    # no load retries: a broken version ends at once (retries: test_lifecycle_retries.py)
    server = ModelServer(base, port=0, poll_interval_s=0.1, max_num_load_retries=0)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            models = model_service_pb2_grpc.ModelServiceStub(channel)

            def served_version():
                response = stub.Predict(predict_request(NORTH_EMPTY), timeout=10)
                return response.model_spec.version.value

            assert served_version() == 1
            staging = str(tmp_path / "staging")
            os.makedirs(staging)
            # version 2 reverses the base scores: north -> i5 (5 + 10), i4 (4), i3 (3)
            write_warmup(save_version(staging, 2, V2_SCORES), NORTH_EMPTY)
            os.rename(os.path.join(staging, "2"), os.path.join(base, "2"))
            wait_for(lambda: served_version() == 2)
            out = outputs_of(stub.Predict(predict_request(NORTH_EMPTY), timeout=10))
            assert out["item_ids"].tolist() == [[b"i5", b"i4", b"i3"]]
            assert version_states(models) == {2: AVAILABLE, 1: END}
            assert error_code(stub.Predict, predict_request(NORTH_EMPTY, version=1)) == (
                grpc.StatusCode.NOT_FOUND)

            # version 3's warmup request lacks an input: the load fails, 2 keeps serving
            bad = save_version(staging, 3, V1_SCORES)
            write_warmup(bad, {"region": ["north"], "age": [1.0]})
            os.rename(bad, os.path.join(base, "3"))
            wait_for(lambda: version_states(models).get(3) == END)
            response = models.GetModelStatus(status_request(version=3), timeout=10)
            [failed] = response.model_version_status
            assert failed.status.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert failed.status.error_message.startswith("warmup failed: input size does not")
            assert served_version() == 2
    finally:
        server.stop(grace_s=1.0)


def test_server_without_versions_waits_and_reports_not_serving(tmp_path):
    server = ModelServer(str(tmp_path), port=0, poll_interval_s=60.0)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            code = error_code(stub.Predict, predict_request(NORTH_EMPTY))
            assert code == grpc.StatusCode.NOT_FOUND
            health_stub = health_pb2_grpc.HealthStub(channel)
            answer = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(grace_s=1.0)
    with pytest.raises(FileNotFoundError, match="--model-base-path"):
        ModelServer(str(tmp_path / "missing"), port=0).start()


def test_tf_serving_model_config_names_the_same_model():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = os.path.join(os.path.dirname(__file__), "..", "..", "serving", "tf_serving",
                        "models.config")
    with open(path) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    assert (model.name, model.base_path) == ("recsys_cvae", "/models/recsys_cvae")
    assert model.model_version_policy.latest.num_versions == 1


def test_process_serves_then_exits_cleanly_on_sigterm(model_base_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.server", "--model-base-path", model_base_path,
         "--port", "0", "--grace-s", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=REPO,
    )
    try:
        line = process.stdout.readline()  # "serving recsys_cvae on 127.0.0.1:<port>"
        assert line.startswith("serving recsys_cvae on 127.0.0.1:"), line
        with grpc.insecure_channel(line.split()[-1]) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(predict_request(NORTH_EMPTY), timeout=10)
            assert response.model_spec.version.value == 1
        process.terminate()
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_a_small_request_cannot_claim_a_huge_decoded_tensor(predict_stub):
    """One string value stands for a whole [1024, 16384] tensor in a ~150-byte message: refused
    from its shape, before anything is decoded (it would take ~1.2 GB)."""
    request = predict_request({"region": ["north"] * 1024, "age": [1.0] * 1024},
                              signature="recommend")
    history = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"i1"])
    history.tensor_shape.dim.add(size=1024)
    history.tensor_shape.dim.add(size=16384)
    request.inputs["item_ids"].CopyFrom(history)
    started = time.time()
    with pytest.raises(grpc.RpcError) as raised:
        predict_stub.Predict(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "decodes to" in raised.value.details()
    assert time.time() - started < 2
