"""REST under load and faults, on loopback and bounded: a burst of 200 connections, clients that
connect and send nothing, and an idle TCP connection in front of HTTPS clients."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time

from serving.server import ModelServer
from tests.builders import write_self_signed_certificate

BODY = json.dumps({"signature_name": "generate",
                   "instances": [{"region": "north", "age": 30.0}]}).encode()


def predict(port: int, context: ssl.SSLContext | None = None, timeout: float = 20.0) -> int:
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                                 context=context)
    try:
        connection.request("POST", "/v1/models/recsys_cvae:predict", BODY,
                           {"Content-Type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


def burst(port: int, count: int, context=None) -> list:
    results: list = []

    def one():
        try:
            results.append(predict(port, context))
        except OSError as error:
            results.append(repr(error))

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_a_burst_and_stalled_clients_do_not_reset_or_starve(model_base_path):
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0,
                         rest_api_num_threads=8, rest_api_timeout_s=1.0)
    server.start()
    try:
        assert burst(server.rest_port, 200) == [200] * 200  # backlog 5 reset 57% of these
        # 20 clients connect and send nothing: more than the 8 handler slots; they are cut
        # after the 1 s timeout, and requests behind them are answered.
        stalled = [socket.create_connection(("127.0.0.1", server.rest_port)) for _ in range(20)]
        started = time.time()
        assert burst(server.rest_port, 16) == [200] * 16
        assert time.time() - started < 15
        for sock in stalled:
            sock.close()
    finally:
        server.stop(grace_s=1.0)


def test_an_idle_tcp_connection_does_not_block_https(model_base_path, tmp_path):
    cert, key = write_self_signed_certificate(str(tmp_path))
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0,
                         ssl_cert=cert, ssl_key=key, rest_api_timeout_s=30.0)
    server.start()
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False
    try:
        idle = socket.create_connection(("127.0.0.1", server.rest_port))  # no TLS hello
        started = time.time()
        assert burst(server.rest_port, 8, context) == [200] * 8
        assert time.time() - started < 10  # not after the idle one's 30 s timeout
        idle.close()
    finally:
        server.stop(grace_s=1.0)
