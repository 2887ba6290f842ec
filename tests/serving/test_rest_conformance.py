"""REST answers as `tensorflow_model_server --rest_api_port` gives them, case by case.

Each case cites the TF Serving source it follows (tensorflow/serving, model_servers/
http_rest_api_handler.cc, http_rest_api_util.cc, http_server.cc; util/json_tensor.cc) or the
REST API document (g3doc/api_rest.md). Requests are raw HTTP over a socket where urllib would
hide what is sent (methods, chunked bodies, bad lengths). Expected values: see conftest.py.
"""

from __future__ import annotations

import json
import socket

import pytest

from serving.server import ModelServer

NORTH = {"region": "north", "age": 30.0}


@pytest.fixture(scope="module")
def port(model_base_path):
    server = ModelServer(model_base_path, port=0, rest_api_port=0, poll_interval_s=60.0,
                         max_message_bytes=64 * 1024)
    server.start()
    yield server.rest_port
    server.stop(grace_s=1.0)


def raw(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one raw HTTP exchange on 127.0.0.1."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def http(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    for key, value in (headers or {}).items():
        head += f"{key}: {value}\r\n"
    if body is not None and "Transfer-Encoding" not in (headers or {}):
        head += f"Content-Length: {len(body)}\r\n"
    status, answer_headers, data = raw(port, head.encode() + b"\r\n" + (body or b""))
    assert answer_headers.get("Content-Type") == "application/json", (status, data[:200])
    return status, json.loads(data)


def predict(port: int, body, path: str = "/v1/models/recsys_cvae:predict"):
    return http(port, "POST", path, json.dumps(body).encode())


# ---- routing: HttpRestApiHandler::ProcessRequest, ParseModelInfo ----------------------------

@pytest.mark.parametrize("method, path, status, message", [
    # no model name: ProcessModelStatusRequest, "Missing model name in request."
    ("GET", "/v1/models", 400, "Missing model name in request."),
    # any other method, or a path the regexes do not match: the default "Malformed request"
    ("PUT", "/v1/models/recsys_cvae", 400, "Malformed request: PUT /v1/models/recsys_cvae"),
    ("DELETE", "/v1/models/recsys_cvae", 400, "Malformed request: DELETE"),
    ("GET", "/v1/models/recsys_cvae:predict", 400, "Malformed request: GET"),
    ("POST", "/v1/models/recsys_cvae", 400, "Malformed request: POST"),
    ("GET", "/v1/other", 400, "Malformed request: GET /v1/other"),
    # unknown model or version: GetModelStatusImpl's NOT_FOUND -> 404 (ToHTTPStatusCode)
    ("GET", "/v1/models/nope", 404, ""),
    ("GET", "/v1/models/recsys_cvae/versions/9", 404, ""),
])
def test_routes_answer_json_errors_with_tf_servings_status(port, method, path, status, message):
    got, body = http(port, method, path, b"" if method in ("PUT", "POST") else None)
    assert got == status and message in body["error"], body


def test_paths_are_case_insensitive_like_the_re2_patterns(port):
    # kModelStatusApiRegex and kPredictionApiGegex start with (?i)
    status, body = http(port, "GET", "/V1/Models/recsys_cvae/Versions/1")
    assert status == 200 and body["model_version_status"][0]["version"] == "1"


def test_a_method_http_server_does_not_know_still_gets_a_json_error(port):
    status, body = http(port, "BREW", "/v1/models/recsys_cvae")
    assert status == 501 and body["error"]


# ---- status and metadata: ToJsonString (http_rest_api_util.cc) -----------------------------

def test_status_prints_defaults_with_the_protos_json_names(port):
    # always_print_fields_with_no_presence; get_model_status.proto's json_name fields
    status, body = http(port, "GET", "/v1/models/recsys_cvae")
    assert status == 200
    assert body == {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {
        "error_code": "OK", "error_message": ""}}]}


def test_metadata_uses_proto_field_names_and_prints_defaults(port):
    # preserve_proto_field_names = true, always_print_fields_with_no_presence = true; the
    # SignatureDefMap is nested as metadata.signature_def.signature_def
    status, body = http(port, "GET", "/v1/models/recsys_cvae/versions/1/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "recsys_cvae", "signature_name": "", "version": "1"}
    signature = body["metadata"]["signature_def"]["signature_def"]["recommend"]
    assert set(signature) == {"inputs", "outputs", "method_name", "defaults"}
    history = signature["inputs"]["item_ids"]
    assert history["dtype"] == "DT_STRING"
    assert history["tensor_shape"] == {"dim": [{"size": "-1", "name": ""},
                                               {"size": "-1", "name": ""}],
                                       "unknown_rank": False}


# ---- typing: AddValueToTensor, FillTensorProto (json_tensor.cc) -----------------------------

@pytest.mark.parametrize("age, fragment", [
    (None, "Type: NULL is not of expected type: float"),
    (True, "Type: TRUE is not of expected type: float"),
    ("30", "Type: STRING is not of expected type: float"),
    ([30], "expects shape [-1]"),  # parsed as [1, 1]; the signature's shape refuses it
    (1e39, "out of range for float32"),
])
def test_a_float_input_takes_json_numbers_only(port, age, fragment):
    status, body = predict(port, {"signature_name": "generate",
                                  "instances": [{"region": "north", "age": age}]})
    assert status == 400 and fragment in body["error"], body


def test_ragged_lists_are_refused(port):
    # FillTensorProto: every list of a level has the first one's size, leaves at one level
    for history, fragment in ((["i1", ["i2"]], "Encountered list at unexpected level"),
                              ([["i1"], "i2"], "found at incorrect level")):
        status, body = predict(port, {"signature_name": "recommend",
                                      "instances": [{**NORTH, "item_ids": history}]})
        assert status == 400 and fragment in body["error"], body


def test_nan_and_integers_are_numbers(port):
    # kParseNanAndInfFlag: NaN is a JSON number to TF Serving; an int is IsNumber()
    status, body = http(port, "POST", "/v1/models/recsys_cvae:predict", (
        b'{"signature_name": "generate", "instances": [{"region": "north", "age": NaN},'
        b' {"region": "south", "age": 30}]}'))
    assert status == 200 and len(body["predictions"]) == 2, body


def test_every_instance_names_every_input(port):
    # FillTensorMapFromInstancesList: "... keys must be equal to: age,region"
    status, body = predict(port, {"signature_name": "generate",
                                  "instances": [NORTH, {"region": "south"}]})
    assert status == 400 and "keys must be equal to: age,region" in body["error"], body
    status, body = predict(port, {"signature_name": "generate", "instances": [
        {**NORTH, "colour": "red"}]})
    assert status == 400 and "does not have named input: colour" in body["error"], body


def test_columnar_inputs_name_every_input(port):
    # FillTensorMapFromInputsMap: "Missing named input: age in 'inputs' object."
    status, body = predict(port, {"signature_name": "generate", "inputs": {"region": ["north"]}})
    assert status == 400 and "Missing named input: age in 'inputs' object." in body["error"]


@pytest.mark.parametrize("body, fragment", [
    ({"signature_name": "generate", "instances": []}, "No values in 'instances' array"),
    ({"signature_name": "generate", "instances": {"region": "x"}}, "to be an list/array"),
    ({"signature_name": "generate", "instances": [NORTH], "inputs": {}}, "only one of"),
    ({"signature_name": "generate"}, "Missing 'inputs' or 'instances' key"),
    ({"signature_name": 7, "instances": [NORTH]}, "'signature_name' key must be a string"),
    ({"signature_name": "nope", "instances": [NORTH]},
     'Serving signature name: "nope" not found in signature def'),
    ([1, 2], "Is not object"),
])
def test_request_shape_errors_are_tf_servings(port, body, fragment):
    status, answer = predict(port, body)
    assert status == 400 and fragment in answer["error"], answer


def test_an_empty_body_and_broken_json_are_parse_errors(port):
    # ParseJson: "JSON Parse error: The document is empty", then the parser's message
    status, body = http(port, "POST", "/v1/models/recsys_cvae:predict", b"")
    assert status == 400 and body["error"] == "JSON Parse error: The document is empty"
    status, body = http(port, "POST", "/v1/models/recsys_cvae:predict", b"{not json")
    assert status == 400 and body["error"].startswith("JSON Parse error")


def test_deep_nesting_is_a_400_not_a_crash(port):
    # rapidjson parses iteratively (kParseIterativeFlag): depth is no crash there either
    deep = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = http(port, "POST", "/v1/models/recsys_cvae:predict", deep[:60_000])
    assert status == 400 and body["error"]


# ---- bodies: net_http reads Content-Length or chunked bodies -------------------------------

def test_a_chunked_body_is_read(port):
    payload = json.dumps({"signature_name": "generate", "instances": [NORTH]}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                       for part in (payload[:10], payload[10:])) + b"0\r\n\r\n"
    status, body = http(port, "POST", "/v1/models/recsys_cvae:predict", chunked,
                        {"Transfer-Encoding": "chunked"})
    assert status == 200 and body["predictions"][0]["item_ids"][0] == "i5", body


def test_a_bad_content_length_is_a_400(port):
    status, _, data = raw(port, b"POST /v1/models/recsys_cvae:predict HTTP/1.1\r\n"
                                b"Host: x\r\nContent-Length: ten\r\n\r\n{}")
    assert status == 400 and "Content-Length" in json.loads(data)["error"]


def test_an_oversized_body_is_answered_not_reset(port):
    # the server reads what the client sends before answering, so the client reads the error
    big = json.dumps({"instances": [{"region": "x" * 200_000, "age": 1}]}).encode()
    status, body = http(port, "POST", "/v1/models/recsys_cvae:predict", big)
    assert status == 429 and "larger than the limit" in body["error"]


# ---- answers: MakeRowFormatJsonFromTensors / MakeColumnarFormatJsonFromTensors -------------

def test_row_and_columnar_answers_have_tf_servings_shape(port):
    status, rows = predict(port, {"signature_name": "generate", "instances": [NORTH]})
    assert status == 200
    assert rows == {"predictions": [{"item_ids": ["i5", "i1", "i2"], "scores": [11.0, 5.0, 4.0]}]}
    status, columns = predict(port, {"signature_name": "generate",
                                     "inputs": {"region": ["north"], "age": [30.0]}})
    assert status == 200
    assert columns == {"outputs": {"item_ids": [["i5", "i1", "i2"]],
                                   "scores": [[11.0, 5.0, 4.0]]}}
