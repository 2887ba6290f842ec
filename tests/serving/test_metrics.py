"""`--monitoring-config-file` and the Prometheus page: scraped and parsed with Prometheus' own
text-format parser (prometheus_client.parser), names and buckets as TF Serving's
(servables/tensorflow/util.cc, util/prometheus_exporter.cc)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.metrics import read_monitoring_config
from serving.server import ModelServer
from tests.builders import REPO, predict_request

SHIPPED_CONFIG = os.path.join(REPO, "serving", "tf_serving", "monitoring.config")


def scrape(port: int) -> dict:
    """metric family name -> {(sample name, labels as sorted tuple): value}."""
    url = f"http://127.0.0.1:{port}/monitoring/prometheus/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value
                          for s in family.samples}
            for family in text_string_to_metric_families(text)}


@pytest.fixture(scope="module")
def monitored(model_base_path):
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0,
                         monitoring_config_file=SHIPPED_CONFIG)
    server.start()
    yield server
    server.stop(grace_s=1.0)


def test_requests_are_counted_by_status_and_timed_per_entrypoint(monitored):
    before = scrape(monitored.rest_port)
    with grpc.insecure_channel(f"127.0.0.1:{monitored.port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(predict_request({"region": ["north"], "age": [30.0]}, "generate"), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Predict(predict_request({"region": ["north"]}, "generate"), timeout=10)
    body = json.dumps({"signature_name": "generate",
                       "instances": [{"region": "north", "age": 30.0}]}).encode()
    url = f"http://127.0.0.1:{monitored.rest_port}/v1/models/recsys_cvae:predict"
    urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10).read()
    after = scrape(monitored.rest_port)

    def delta(family: str, sample: str, **labels) -> float:
        key = (sample, tuple(sorted(labels.items())))
        return after[family].get(key, 0) - before.get(family, {}).get(key, 0)

    count = ":tensorflow:serving:request_count"
    # the parser names a counter's samples NAME_total (TF Serving writes plain NAME lines)
    assert delta(count, count + "_total", model_name="recsys_cvae", status="OK") == 2
    assert delta(count, count + "_total", model_name="recsys_cvae",
                 status="INVALID_ARGUMENT") == 1
    latency = ":tensorflow:serving:request_latency"
    for entrypoint, api in (("GRPC", "Predict"), ("REST", "predict")):
        assert delta(latency, latency + "_count", model_name="recsys_cvae", API=api,
                     entrypoint=entrypoint) == 1
    runtime = ":tensorflow:serving:runtime_latency"
    assert delta(runtime, runtime + "_count", model_name="recsys_cvae", API="Predict",
                 runtime="TF1") == 2


def test_latency_buckets_are_tf_servings_and_loads_are_counted(monitored):
    page = scrape(monitored.rest_port)
    latency = page[":tensorflow:serving:request_latency"]
    limits = sorted({dict(labels)["le"] for name, labels in latency if name.endswith("_bucket")},
                    key=float)
    # Buckets::Exponential(10, 1.8, 33): 10, 18, 32.4, ... then +Inf
    assert limits[:3] == ["10", "18", "32.4"] and limits[-1] == "+Inf" and len(limits) == 34
    warmup = page[":tensorflow:serving:model_warmup_latency"]
    assert any(dict(labels).get("status") == "OK" for _, labels in warmup)
    loads = page[":tensorflow:cc:saved_model:load_attempt_count"]
    assert any(dict(labels)["status"] == "success" and value >= 1
               for (_, labels), value in loads.items())
    assert ":tensorflow:serving:request_example_counts" in page  # declared, Example inputs only


def test_the_monitoring_config_is_tf_servings_text_proto(tmp_path):
    assert read_monitoring_config(SHIPPED_CONFIG) == "/monitoring/prometheus/metrics"
    off = tmp_path / "off.config"
    off.write_text("prometheus_config { enable: false }\n")
    assert read_monitoring_config(str(off)) is None
    custom = tmp_path / "custom.config"
    custom.write_text('prometheus_config { enable: true path: "/metrics" }\n')
    assert read_monitoring_config(str(custom)) == "/metrics"
    bad = tmp_path / "bad.config"
    bad.write_text("prometheus { enable: true }\n")
    with pytest.raises(ValueError, match="bad.config: not a MonitoringConfig text proto"):
        read_monitoring_config(str(bad))


def test_metrics_need_the_rest_port(model_base_path):
    with pytest.raises(ValueError, match="add --rest-api-port"):
        ModelServer(model_base_path, port=0, monitoring_config_file=SHIPPED_CONFIG)


def test_without_monitoring_the_path_is_not_served(port_without_monitoring):
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(
            f"http://127.0.0.1:{port_without_monitoring}/monitoring/prometheus/metrics",
            timeout=10)
    assert raised.value.code == 404


@pytest.fixture
def port_without_monitoring(model_base_path):
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0)
    server.start()
    yield server.rest_port
    server.stop(grace_s=1.0)
