"""REST under load and faults, on loopback and bounded: a burst of 200 connections, clients that
connect and send nothing, an idle TCP connection in front of HTTPS clients, and HTTP/1.1
keep-alive (reused, pipelined and idle connections; `serving.http_connections`)."""

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
        reused = http.client.HTTPSConnection("127.0.0.1", server.rest_port, timeout=10,
                                             context=context)
        assert [request_on(reused) for _ in range(3)] == [200] * 3  # TLS keep-alive
        reused.close()
        idle.close()
    finally:
        server.stop(grace_s=1.0)


# ---- keep-alive: HTTP/1.1 connections reused, idle ones hold no worker ----------------------

def request_on(connection: http.client.HTTPConnection) -> int:
    connection.request("POST", "/v1/models/recsys_cvae:predict", BODY,
                       {"Content-Type": "application/json"})
    answer = connection.getresponse()
    answer.read()
    return answer.status


def test_keep_alive_connections_are_reused_and_idle_ones_hold_no_worker(model_base_path):
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0,
                         rest_api_num_threads=2, rest_api_timeout_s=30.0)
    server.start()
    connections = [http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
                   for _ in range(6)]
    try:
        assert [request_on(c) for c in connections] == [200] * 6
        sockets = [c.sock for c in connections]
        # six idle keep-alive connections, two workers: a new client is still answered now,
        # not after the 30 s idle timeout
        started = time.time()
        assert predict(server.rest_port, timeout=5) == 200
        assert time.time() - started < 3
        assert [request_on(c) for c in connections] == [200] * 6
        assert [c.sock for c in connections] == sockets  # same TCP connections, no reconnect
    finally:
        for connection in connections:
            connection.close()
        server.stop(grace_s=1.0)


def test_pipelined_requests_are_answered_in_order_and_idle_ones_closed(model_base_path):
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0,
                         rest_api_timeout_s=0.5)
    server.start()
    one = (b"POST /v1/models/recsys_cvae:predict HTTP/1.1\r\nHost: x\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
    status = b"GET /v1/models/recsys_cvae HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=5) as sock:
            sock.sendall(one + status)
            data, started = b"", time.time()
            while chunk := sock.recv(65536):  # the server closes it after 0.5 s idle
                data += chunk
            assert time.time() - started < 4
        answers = data.split(b"HTTP/1.1 ")[1:]
        assert [a.split(b" ", 1)[0] for a in answers] == [b"200", b"200"]
        assert b'"predictions"' in answers[0] and b'"model_version_status"' in answers[1]
    finally:
        server.stop(grace_s=1.0)


def test_an_unread_request_body_closes_the_connection(model_base_path):
    # bytes of a body the route does not read must not be parsed as the next request
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=5) as sock:
            sock.sendall(b"GET /v1/models/recsys_cvae HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 18\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in data
    finally:
        server.stop(grace_s=1.0)
