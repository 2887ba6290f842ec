"""--ssl-client-ca: gRPC and REST accept only clients with a certificate the CA signed."""

from __future__ import annotations

import http.client
import json
import ssl

import grpc
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from serving.server import ModelServer
from tests.builders import outputs_of, predict_request, write_self_signed_certificate

NORTH = {"region": ["north"], "age": [30.0]}


@pytest.fixture(scope="module")
def mtls(model_base_path, tmp_path_factory):
    server_dir, client_dir = tmp_path_factory.mktemp("server"), tmp_path_factory.mktemp("client")
    cert, key = write_self_signed_certificate(str(server_dir))
    client_cert, client_key = write_self_signed_certificate(str(client_dir))
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0,
                         ssl_cert=cert, ssl_key=key, ssl_client_ca=client_cert)
    server.start()
    yield server, cert, client_cert, client_key
    server.stop(grace_s=1.0)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_grpc_needs_the_client_certificate(mtls):
    server, cert, client_cert, client_key = mtls
    target = f"127.0.0.1:{server.port}"
    mutual = grpc.ssl_channel_credentials(read(cert), read(client_key), read(client_cert))
    with grpc.secure_channel(target, mutual) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        out = outputs_of(stub.Predict(predict_request(NORTH, "generate"), timeout=10))
        assert out["item_ids"][0][0] == b"i5"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(read(cert))) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(predict_request(NORTH, "generate"), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused


def test_rest_needs_the_client_certificate(mtls):
    server, cert, client_cert, client_key = mtls
    body = json.dumps({"signature_name": "generate",
                       "instances": [{"region": "north", "age": 30.0}]})

    def ask(context):
        connection = http.client.HTTPSConnection("127.0.0.1", server.rest_port, timeout=10,
                                                 context=context)
        connection.request("POST", "/v1/models/recsys_cvae:predict", body)
        return connection.getresponse().status

    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        ask(context)
    context.load_cert_chain(client_cert, client_key)
    assert ask(context) == 200


def test_a_client_ca_without_tls_is_refused(model_base_path, tmp_path):
    cert, _ = write_self_signed_certificate(str(tmp_path))
    with pytest.raises(ValueError, match="--ssl-client-ca needs --ssl-cert"):
        ModelServer(model_base_path, port=0, ssl_client_ca=cert)
