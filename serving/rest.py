"""TF Serving's REST API in front of a ModelServer (standard library http.server only).

Why: browsers, curl and languages without gRPC tooling use TF Serving's REST API; offering the
same paths and JSON shapes keeps the embedded server a drop-in for `tensorflow_model_server
--rest_api_port`. Every request becomes the PredictRequest / GetModelStatusRequest /
GetModelMetadataRequest the gRPC service answers, so validation and errors are shared.

Paths (version may be `/versions/<n>` or `/labels/<label>`, or omitted for the newest):
  POST /v1/models/<name>[/versions/<n>]:predict   {"signature_name": s, "instances": [...]}
                                                  or {"signature_name": s, "inputs": {...}}
  GET  /v1/models/<name>[/versions/<n>]           model status
  GET  /v1/models/<name>[/versions/<n>]/metadata  signature defs

Row format ("instances": one object per user) answers {"predictions": [...]}; columnar format
("inputs": name -> batch-major lists) answers {"outputs": {...}}. Errors answer {"error": msg}
with TF Serving's HTTP status for the gRPC code (INVALID_ARGUMENT 400, NOT_FOUND 404, ...).

Example:
  curl -d '{"signature_name": "generate", "instances": [{"region": "north", "age": 30}]}' \
      http://127.0.0.1:8501/v1/models/recsys_cvae:predict
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from http import HTTPStatus

import grpc
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from serving import metrics as M
from serving.http_connections import KeepAliveHandler, PooledHTTPServer
from serving.json_tensors import JsonTensorError, request_tensors, response_body
from serving.servable import DEFAULT_SIGNATURE, RpcError, invalid

# tensorflow_serving/model_servers/http_rest_api_util.cc: kPredictionApiGegex and
# kModelStatusApiRegex, matched in full and case-insensitively like RE2::FullMatch with (?i).
_PREDICT_PATH = re.compile(
    r"/v1/models/(?P<name>[^/:]+)(?:(?:/versions/(?P<version>\d+))|(?:/labels/(?P<label>[^/:]+)))?"
    r":(?P<method>classify|regress|predict)", re.IGNORECASE)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/(?P<name>[^/:]+))?(?:(?:/versions/(?P<version>\d+))|"
    r"(?:/labels/(?P<label>[^/:]+)))?(?:/(?P<sub>metadata))?", re.IGNORECASE)
# http_rest_api_handler.cc's kPathRegex: everything else is not the REST API's.
_API_PATH = re.compile(r"/v1/.*", re.IGNORECASE)
# A request body larger than the message cap is read and dropped up to this many bytes, so the
# client reads the error instead of a reset connection; past it the connection is closed.
_MAX_DRAIN_BYTES = 64 * 1024 * 1024
# REST worker threads when --rest-api-num-threads is 0. TF Serving's default is 4 per CPU, for
# C++ threads; here the JSON work of a request holds the interpreter lock, so the threads
# that help are about as many as can overlap a model call (which releases it) with that
# work. Measured (bench_serving's export, 2 cores, 8 and 64 clients): 2 or 4 threads answer
# 10-15% more requests/s than 8 at batch 1 and 32, with lower p99; 4 leaves room for a few
# clients slow to send their bodies (each holds a thread until --rest-api-timeout-in-ms).
DEFAULT_REST_THREADS = 4
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class _Handler(KeepAliveHandler):
    model_server = None  # set on the subclass made by RestServer
    metrics_path = None  # the Prometheus page's path, when monitoring is on
    _body_read = False  # whether this request's body has been read (keep-alive needs it)

    def log_message(self, format, *args):  # noqa: A002  (quiet: the gRPC server logs)
        pass

    def _reply(self, status: int, body: dict | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if not self.close_connection and not self._body_read and self._has_body():
            self.close_connection = True  # an unread body would be taken for the next request
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):  # noqa: D102
        """http.server's own errors (unknown method, bad request line, header too long) as
        TF Serving's JSON error body instead of an HTML page."""
        self.close_connection = True
        try:
            self._reply(code, {"error": message or HTTPStatus(code).phrase})
        except OSError:
            pass

    def _has_body(self) -> bool:
        headers = getattr(self, "headers", None)
        if headers is None:
            return False
        return ("chunked" in (headers.get("Transfer-Encoding") or "").lower()
                or (headers.get("Content-Length") or "0").strip() != "0")

    def _answer(self) -> None:
        self._body_read = False
        method, path = self.command, urllib.parse.urlsplit(self.path).path
        if self.metrics_path and method == "GET" and path == self.metrics_path:
            return self._metrics_page()
        started, self._model_name, self._api = time.perf_counter(), "", ""
        code = grpc.StatusCode.OK
        try:
            if not _API_PATH.fullmatch(path):
                raise RpcError(grpc.StatusCode.NOT_FOUND, f"Not found: {method} {path}")
            status, body = 200, self._route(method, path)
        except RpcError as error:
            code = error.code
            status, body = _HTTP_STATUS.get(error.code, 500), {"error": error.message}
        except Exception as error:  # noqa: BLE001  (answer, never drop the connection)
            code = grpc.StatusCode.INTERNAL
            status = 500
            body = {"error": str(error).splitlines()[0] if str(error) else "error"}
        # http_server.cc: the latency of successful REST calls, a count of every call; counted
        # before the reply goes out, so a client that scrapes after its answer sees its call
        if code == grpc.StatusCode.OK:
            M.REQUEST_LATENCY.add((time.perf_counter() - started) * 1e6, self._model_name,
                                  self._api, "REST")
        M.REQUEST_COUNT.increment(self._model_name, code.name)
        self._reply(status, body)

    def _metrics_page(self) -> None:
        data = M.prometheus_page().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str, path: str) -> dict | bytes:
        """`HttpRestApiHandler::ProcessRequest`: POST predict paths and GET status/metadata
        paths; anything else, on any method, is "Malformed request" (INVALID_ARGUMENT)."""
        malformed = invalid(f"Malformed request: {method} {path}")
        match = (_PREDICT_PATH.fullmatch(path) if method == "POST"
                 else _STATUS_PATH.fullmatch(path) if method == "GET" else None)
        if match is None:
            self._drain()
            raise malformed
        spec = {"name": urllib.parse.unquote(match["name"] or "")}
        self._model_name = spec["name"]
        self._api = (match["method"] or "").lower() if method == "POST" else ""
        if match["version"]:
            spec["version"] = match["version"]
        if match["label"]:
            spec["version_label"] = urllib.parse.unquote(match["label"])
        if method == "POST":
            if match["method"].lower() != "predict":
                self._drain()
                raise invalid(f"{match['method']} is not served here: every signature of a "
                              "recsys-cvae export is a predict signature; use :predict")
            return self._predict(spec)
        if not spec["name"]:
            raise invalid("Missing model name in request.")
        return self._metadata(spec) if match["sub"] else self._status(spec)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _answer

    def _read_body(self) -> bytes:
        """The request body: Content-Length or chunked, capped at the server's message size."""
        self._body_read = True
        cap = self.model_server.max_message_bytes
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked(cap)
        text = self.headers.get("Content-Length")
        if text is None:
            return b""
        if not text.strip().isdigit():
            self.close_connection = True
            raise invalid(f"Invalid Content-Length: {text!r}")
        length = int(text)
        if length > cap:
            self._discard(length)
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"request body of {length} bytes is larger than the limit of {cap}")
        return self.rfile.read(length)

    def _read_chunked(self, cap: int) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                self.close_connection = True
                raise invalid(f"Invalid chunk size line: {line[:40]!r}") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(body)
            if len(body) + size > cap:
                self.close_connection = True
                raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"request body larger than the limit of {cap} bytes")
            body += self.rfile.read(size)
            self.rfile.readline(8)  # the chunk's CRLF

    def _discard(self, length: int) -> None:
        """Reads and drops a body too large to parse, so the client sees the answer."""
        self.close_connection = True
        left = min(length, _MAX_DRAIN_BYTES)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                return
            left -= len(chunk)

    def _drain(self) -> None:
        """Reads the body of a request that is refused before its body is needed."""
        try:
            self._read_body()
        except RpcError:
            pass

    def _predict(self, spec: dict) -> bytes:
        data = self._read_body()
        if not data.strip():
            raise invalid("JSON Parse error: The document is empty")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as error:
            raise invalid(f"JSON Parse error: {str(error)[:200]}") from None
        if isinstance(body, dict) and "signature_name" in body and not isinstance(
                body["signature_name"], str):
            raise invalid(f"JSON Value: {json.dumps(body)[:200]} not formatted correctly. "
                          "'signature_name' key must be a string value.")
        signature_name = (body.get("signature_name") if isinstance(body, dict) else "") or ""
        request = predict_pb2.PredictRequest()
        json_format.ParseDict({"model_spec": spec}, request)
        request.model_spec.signature_name = signature_name or DEFAULT_SIGNATURE
        name = request.model_spec.signature_name
        signature = self.model_server.resolve(request.model_spec).signature_defs.get(name)
        if signature is None:  # HttpRestApiHandler::GetInfoMap
            raise invalid(f'Serving signature name: "{name}" not found in signature def')
        try:
            arrays, form = request_tensors(
                body, {key: info.dtype for key, info in signature.inputs.items()})
        except JsonTensorError as error:
            raise invalid(str(error)) from None
        _, _, outputs = self.model_server.run_predict(request, arrays)
        try:
            return response_body(outputs, form)
        except JsonTensorError as error:
            raise invalid(str(error)) from None

    def _metadata(self, spec: dict) -> dict:
        """`ToJsonString(GetModelMetadataResponse)`: proto field names, defaults printed."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        json_format.ParseDict({"model_spec": spec}, request)
        response = self.model_server.metadata(request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {"model_spec": _proto_json(response.model_spec),
                "metadata": {"signature_def": _proto_json(signature_map)}}

    def _status(self, spec: dict) -> dict:
        """`ToJsonString(GetModelStatusResponse)`: the proto's json names, defaults printed."""
        request = get_model_status_pb2.GetModelStatusRequest()
        json_format.ParseDict({"model_spec": spec}, request)
        response = self.model_server.status(request)
        for entry in response.model_version_status:
            entry.status.SetInParent()  # OK status printed as {"error_code": "OK", ...}
        return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)


def _proto_json(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


class RestServer:
    """Serves TF Serving's REST API for `model_server` on host:port (0 picks a free port).

    With an `ssl_context` (ssl.SSLContext for a server) it speaks HTTPS only. HTTP/1.1
    keep-alive; `num_threads` workers answer requests, however many connections are open
    (`serving.http_connections`). `stop()` waits for requests in flight to be answered.
    """

    def __init__(self, model_server, host: str = "127.0.0.1", port: int = 8501,
                 ssl_context=None, num_threads: int = 0, timeout_s: float = 30.0,
                 metrics_path: str | None = None):
        handler = type("Handler", (_Handler,), {"model_server": model_server,
                                                "metrics_path": metrics_path})
        threads = num_threads or DEFAULT_REST_THREADS
        self._httpd = PooledHTTPServer((host, port), handler, ssl_context, threads, timeout_s)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="rest-api", daemon=True)

    def start(self) -> int:
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._httpd.stop()
