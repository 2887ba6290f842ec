"""TF Serving's REST API of the embedded server (expected values: see conftest.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from serving.server import ModelServer


@pytest.fixture(scope="module")
def rest_url(model_base_path):
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0)
    server.start()
    yield f"http://127.0.0.1:{server.rest_port}/v1/models"
    server.stop(grace_s=1.0)


def call(url: str, body: dict | str | None = None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
    request = urllib.request.Request(url, data=None if data is None else data.encode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_predict_row_format(rest_url):
    status, body = call(f"{rest_url}/recsys_cvae:predict", {
        "signature_name": "recommend",
        "instances": [{"item_ids": ["i1", ""], "region": "north", "age": 30},
                      {"item_ids": ["", ""], "region": "south", "age": float("nan")}],
    })
    assert status == 200, body
    # user 0 saw i1: i5 (1 + 10), i2 (4), i3 (3); user 1: south adds 10 to i4
    assert body["predictions"] == [
        {"item_ids": ["i5", "i2", "i3"], "scores": [11.0, 4.0, 3.0]},
        {"item_ids": ["i4", "i1", "i2"], "scores": [12.0, 5.0, 4.0]},
    ]


def test_predict_columnar_format_with_version(rest_url):
    status, body = call(f"{rest_url}/recsys_cvae/versions/1:predict", {
        "signature_name": "encode",
        "inputs": {"item_ids": [["i2", "i3"]], "region": ["north"], "age": [7]},
    })
    assert status == 200, body
    assert body["outputs"] == {"z_mean": [[7.0, 2.0]], "z_log_var": [[0.0, 0.0]]}


def test_status_and_metadata(rest_url):
    assert call(f"{rest_url}/recsys_cvae") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]})
    status, body = call(f"{rest_url}/recsys_cvae/metadata")
    assert status == 200
    assert body["model_spec"]["version"] == "1"
    generate = body["metadata"]["signature_def"]["signature_def"]["generate"]
    assert generate["inputs"]["age"]["dtype"] == "DT_FLOAT"
    assert generate["inputs"]["age"]["tensor_shape"]["dim"][0]["size"] == "-1"
    assert generate["method_name"] == "tensorflow/serving/predict"


@pytest.mark.parametrize("path, body, status", [
    ("/other:predict", {"instances": [{"region": "x", "age": 1}]}, 404),
    ("/recsys_cvae/versions/9", None, 404),
    ("/recsys_cvae/labels/canary:predict", {"instances": []}, 400),
    ("/recsys_cvae:predict", {"signature_name": "nope", "instances": []}, 400),
    ("/recsys_cvae:predict", {"signature_name": "generate", "instances": [{"region": "x"}]}, 400),
    ("/recsys_cvae:predict", {"signature_name": "generate",
                              "instances": [{"region": "x", "age": "old"}]}, 400),
    ("/recsys_cvae:predict", "{not json", 400),
    ("/recsys_cvae:predict", {"inputs": {}, "instances": []}, 400),
])
def test_errors_use_tf_serving_http_statuses(rest_url, path, body, status):
    got, answer = call(rest_url + path, body)
    assert got == status and answer["error"], answer
