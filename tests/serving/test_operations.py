"""Running the embedded server: batching, TLS, several models, hot reload under load, SIGTERM.

Expected values come from the tiny model in conftest.py (version 1: base scores 5, 4, 3, 2, 1
for i1..i5, +10 on i5 for "north", +10 on i4 for "south", top 3; version 2 reverses the base).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.batching import Batcher
from serving.client import RecommenderClient, ServingError
from serving.server import ModelServer
from serving.versions import read_model_config_file
from tests.builders import (
    NORTH_EMPTY,
    REPO,
    V1_SCORES,
    V2_SCORES,
    outputs_of,
    predict_request,
    save_version,
    write_self_signed_certificate,
)


def test_batcher_merges_concurrent_calls_and_returns_each_its_rows():
    batcher = Batcher(max_batch_size=6, timeout_s=0.5)
    seen_batches = []

    def double(arrays):  # records each merged batch it is called with
        seen_batches.append(len(arrays["x"]))
        return {"y": arrays["x"] * 2}

    barrier = threading.Barrier(3)

    def one(value, rows):
        barrier.wait()
        return batcher.run(("k",), double, {"x": np.full((rows, 2), value)})["y"]

    with futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, [1.0, 2.0, 3.0], [1, 2, 3]))
    # 1 + 2 + 3 rows = 6 = max_batch_size: one call, no timeout wait; each gets its own rows
    assert seen_batches == [6] and batcher.calls == 1
    for value, rows, result in zip([1, 2, 3], [1, 2, 3], results):
        np.testing.assert_array_equal(result, np.full((rows, 2), 2 * value))


def test_batcher_splits_large_requests_into_batches_and_joins_the_rows():
    # enable_large_batch_splitting: 10 rows at max 4 -> pieces of 4, 4, 2, answered in order
    batcher = Batcher(max_batch_size=4, timeout_s=0.0, split_large_batches=True)
    calls = []

    def record(arrays):
        calls.append(len(arrays["x"]))
        return {"y": arrays["x"] * 10}

    x = np.arange(10, dtype=float).reshape(10, 1)
    np.testing.assert_array_equal(batcher.run(("k",), record, {"x": x})["y"], x * 10)
    assert calls == [4, 4, 2]


def test_batching_parameters_are_tf_servings_text_proto(tmp_path):
    from serving.batching import read_batching_parameters

    shipped = os.path.join(REPO, "serving", "tf_serving", "batching_parameters.txt")
    assert read_batching_parameters(shipped) == {
        "max_batch_size": 1024, "timeout_s": 0.002, "split_large_batches": True}
    path = tmp_path / "b.txt"
    path.write_text("max_batch_size { value: 64 }\nmax_execution_batch_size { value: 16 }\n")
    assert read_batching_parameters(str(path)) == {
        "max_batch_size": 16, "timeout_s": 0.0, "split_large_batches": False}
    path.write_text("max_batch_size: 64\n")  # a wrapper type, not a scalar
    with pytest.raises(ValueError, match="b.txt: not a BatchingParameters text proto"):
        read_batching_parameters(str(path))
    with pytest.raises(ValueError, match="apply with --enable-batching"):
        ModelServer(str(tmp_path), port=0, batching_parameters_file=shipped)


def test_batcher_runs_big_and_empty_requests_alone_and_shares_errors():
    batcher = Batcher(max_batch_size=4, timeout_s=0.0, split_large_batches=False)
    calls = []

    def record(arrays):
        calls.append(len(arrays["x"]))
        return {"y": arrays["x"]}

    assert batcher.run(("k",), record, {"x": np.zeros((5, 1))})["y"].shape == (5, 1)
    assert batcher.run(("k",), record, {"x": np.zeros((0, 1))})["y"].shape == (0, 1)
    assert calls == [5, 0] and batcher.calls == 0  # neither went through a batch

    def fail(arrays):
        raise ValueError("model says no")

    with pytest.raises(ValueError, match="model says no"):
        batcher.run(("k",), fail, {"x": np.zeros((1, 1))})


def test_server_side_batching_answers_each_user_correctly(model_base_path):
    server = ModelServer(model_base_path, port=0, poll_interval_s=60.0, enable_batching=True,
                         batch_size=8, batch_timeout_s=0.2)
    port = server.start()
    regions = ["north", "south", ""] * 4
    # north -> i5 (11) first, south -> i4 (12) first, unknown -> i1 (5) first
    first = {"north": b"i5", "south": b"i4", "": b"i1"}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

            def ask(region):
                request = predict_request({"item_ids": [["i2"]], "region": [region], "age": [1.0]})
                return outputs_of(stub.Predict(request, timeout=20))["item_ids"][0]

            with futures.ThreadPoolExecutor(len(regions)) as pool:
                answers = list(pool.map(ask, regions))
            wider = predict_request({"item_ids": [["i2", ""]], "region": ["north"], "age": [1.0]})
            assert outputs_of(stub.Predict(wider, timeout=20))["item_ids"][0][0] == b"i5"
    finally:
        server.stop(grace_s=1.0)
    assert [a[0] for a in answers] == [first[r] for r in regions]
    assert all(b"i2" not in a for a in answers)  # each row kept its own history mask
    assert server.batcher.calls < len(regions)  # some requests shared a model call


def test_tls_round_trip_with_a_certificate_made_here(tmp_path, model_base_path):
    cert, key = write_self_signed_certificate(str(tmp_path))
    server = ModelServer(model_base_path, port=0, poll_interval_s=60.0, rest_api_port=0,
                         ssl_cert=cert, ssl_key=key)
    port = server.start()
    try:
        target = f"127.0.0.1:{port}"
        with RecommenderClient(target, root_certificates=cert, timeout_s=10) as client:
            assert client.generate({"region": ["north"]})[0][0] == ("i5", 11.0)
        with RecommenderClient(target, retries=0, timeout_s=3) as plaintext:
            with pytest.raises(ServingError, match="UNAVAILABLE"):
                plaintext.status()
        context = ssl.create_default_context(cafile=cert)
        url = f"https://127.0.0.1:{server.rest_port}/v1/models/recsys_cvae"
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            assert json.load(answer)["model_version_status"][0]["state"] == "AVAILABLE"
    finally:
        server.stop(grace_s=1.0)
    with pytest.raises(ValueError, match="both --ssl-cert and --ssl-key"):
        ModelServer(model_base_path, ssl_cert=cert)


def test_model_config_file_serves_several_models(tmp_path, model_base_path):
    save_version(str(tmp_path / "b"), 2, V2_SCORES)  # model b: version 2 only
    config = tmp_path / "models.config"
    config.write_text(f"""
model_config_list {{
  config {{ name: "a" base_path: "{model_base_path}" model_platform: "tensorflow" }}
  config {{ name: "b" base_path: "b" version_labels {{ key: "stable" value: 2 }} }}
}}""")
    server = ModelServer(model_config_file=str(config), port=0, poll_interval_s=60.0)
    port = server.start()
    try:
        target = f"127.0.0.1:{port}"
        with RecommenderClient(target, model_name="a") as a, \
                RecommenderClient(target, model_name="b") as b:
            # a is version 1 (i1 first without region), b is version 2 (i5 first)
            assert a.generate({"region": [""]})[0][0] == ("i1", 5.0)
            assert b.generate({"region": [""]})[0][0] == ("i5", 5.0)
            assert [s["version"] for s in b.status()] == [2]
        with grpc.insecure_channel(target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            labelled = predict_request(NORTH_EMPTY, name="b", label="stable")
            assert stub.Predict(labelled, timeout=10).model_spec.version.value == 2
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(predict_request(NORTH_EMPTY, name="c"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(grace_s=1.0)
    config.write_text('model_config_list { config { name: "a" } }')
    with pytest.raises(ValueError, match="models.config: model a: every config needs"):
        read_model_config_file(str(config))


def test_the_shipped_tf_serving_config_is_readable():
    [model] = read_model_config_file(os.path.join(REPO, "serving", "tf_serving", "models.config"))
    assert (model.name, model.base_path, model.policy) == (
        "recsys_cvae", "/models/recsys_cvae", "latest")


def test_new_versions_under_load_are_served_without_a_failed_request(tmp_path, model_base_path):
    base, staging = str(tmp_path / "base"), str(tmp_path / "staging")
    shutil.copytree(model_base_path, base)
    save_version(staging, 2, V2_SCORES)
    save_version(staging, 3, V1_SCORES)
    server = ModelServer(base, port=0, poll_interval_s=0.05)
    port = server.start()
    stop = threading.Event()
    failures, versions = [], []
    answered: dict[int, list[int]] = {}  # per thread, in the order its requests were sent

    def hammer(thread: int):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                try:
                    response = stub.Predict(predict_request(NORTH_EMPTY), timeout=30)
                    versions.append(response.model_spec.version.value)
                    answered.setdefault(thread, []).append(versions[-1])
                except grpc.RpcError as error:
                    failures.append((error.code(), error.details()))

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(4)]
    try:
        for thread in threads:
            thread.start()
        for version in (2, 3):
            time.sleep(0.3)
            os.rename(os.path.join(staging, str(version)), os.path.join(base, str(version)))
            deadline = time.monotonic() + 30
            while (not versions or versions[-1] != version) and time.monotonic() < deadline:
                time.sleep(0.02)
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop(grace_s=1.0)
    assert failures == []
    assert {1, 2, 3} <= set(versions) and versions[-1] == 3
    # A request sent after one that a newer version answered never gets an older version.
    # Per thread: across threads the order of `versions` is when each answer was appended,
    # not when it was served, so another thread's v2 answer may be appended after a v3.
    assert len(answered) == 4
    for sequence in answered.values():
        assert sequence == sorted(sequence), sequence


def test_sigterm_lets_the_request_in_flight_finish(tmp_path, model_base_path):
    # A 20 s batching timeout holds a lone request in flight; SIGTERM must answer it at once
    # (the drain flushes the batch), not drop it.
    # stderr goes to a file and faulthandler is on: a server that does not exit is sent SIGABRT
    # and the failure shows every thread's stack.
    stderr_path = tmp_path / "server.stderr"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.server", "--model-base-path", model_base_path,
             "--port", "0", "--enable-batching", "--batch-timeout-ms", "20000", "--grace-s", "20"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
    try:
        line = process.stdout.readline()  # "serving recsys_cvae on 127.0.0.1:<port>"
        assert line.startswith("serving recsys_cvae on 127.0.0.1:"), line
        with grpc.insecure_channel(line.split()[-1]) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            in_flight = stub.Predict.future(predict_request(NORTH_EMPTY), timeout=30)
            time.sleep(1.0)
            assert not in_flight.done()  # still waiting in its batch
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            response = in_flight.result()
            # answered by the drain, not by the batch timeout running out 19 s later
            assert time.monotonic() - signalled < 10.0
            assert outputs_of(response)["item_ids"].tolist() == [[b"i5", b"i1", b"i2"]]
            try:
                assert process.wait(timeout=30) == 0
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
                process.wait(timeout=10)
                pytest.fail("server answered but did not exit:\n" + stderr_path.read_text()[-6000:])
            with pytest.raises(grpc.RpcError) as raised:
                stub.Predict(predict_request(NORTH_EMPTY), timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        if process.poll() is None:
            process.kill()


def test_a_stop_signal_before_wait_for_signal_is_kept_and_drains(model_base_path):
    # The server catches SIGTERM before it prints its address; a signal sent at once must
    # stop it gracefully once it waits, not be lost (or kill the process).
    server = ModelServer(model_base_path, port=0, poll_interval_s=60.0)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.catch_stop_signals()
        port = server.start()
        signal.raise_signal(signal.SIGTERM)
        server.wait_for_signal(grace_s=1.0)  # returns: the signal was recorded
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.stop(grace_s=0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(predict_request(NORTH_EMPTY), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_serve_flags_reach_the_server_and_query_speaks_tls(tmp_path, model_base_path):
    from recsys_cvae.cli import build_parser, run_query, workdir_from_args
    from serving.flags import server_kwargs

    cert, key = write_self_signed_certificate(str(tmp_path))
    args = build_parser().parse_args([
        "serve", "--model-base-path", model_base_path, "--port", "0", "--enable-batching",
        "--batch-size", "4", "--batch-timeout-ms", "1", "--ssl-cert", cert, "--ssl-key", key,
        "--version-label", "stable=1", "--max-batch-size", "16",
    ])
    server = ModelServer(args.model_base_path, **server_kwargs(args))
    assert (server.batcher.max_batch_size, server.batcher.timeout_s) == (4, 0.001)
    assert server.models["recsys_cvae"].config.version_labels == {"stable": 1}
    port = server.start()
    try:
        query_args = build_parser().parse_args([
            "query", "--target", f"127.0.0.1:{port}", "--signature", "generate",
            "--attr", "region=south", "--ssl-root-cert", cert,
        ])
        # south adds 10 to i4: i4 (2 + 10) first
        work = workdir_from_args(query_args)
        assert run_query(query_args, work).splitlines()[1].split()[:2] == ["1", "i4"]
    finally:
        server.stop(grace_s=1.0)
