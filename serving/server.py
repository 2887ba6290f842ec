"""An embedded server that speaks TF Serving's gRPC and REST APIs for one or more models.

Why it exists: `tensorflow_model_server` is a separate binary (or a Docker image) that is not
always at hand: on a laptop, in CI, in a notebook. This server answers the same protos with
the same status codes, so a client written against it works unchanged against the real thing
(see `serving/tf_serving/` for that deployment). It imports TensorFlow, grpcio and
tensorflow-serving-api only, never the model code: it serves any SavedModel of the layout

    <model_base_path>/<version>/saved_model.pb   (integer versions, newest served)

The services:
- `tensorflow.serving.PredictionService`: `Predict` and `GetModelMetadata`; `Classify`,
  `Regress` and `MultiInference` answer UNIMPLEMENTED (the export has predict signatures only).
- `tensorflow.serving.ModelService`: `GetModelStatus` (START, LOADING, AVAILABLE, UNLOADING, END).
- `grpc.health.v1.Health`: SERVING once every model has an available version.
- optionally TF Serving's REST API (`--rest-api-port`, see `serving/rest.py`).
Request validation (which request is refused, with which code) lives in `serving/servable.py`.

Versions follow TF Serving's version policy (default latest 1; see `serving/versions.py`): a
background thread polls each base path, loads a newer version (replaying
`assets.extra/tf_serving_warmup_requests`), switches to it atomically and drops the old one.
Several models come from `--model-config-file` (TF Serving's ModelServerConfig text format).
Optional: server-side batching of concurrent small requests (`--enable-batching`, see
`serving/batching.py`), TLS (`--ssl-cert/--ssl-key`, for gRPC and REST). SIGTERM stops
accepting requests and lets those in flight finish (up to `--grace-s`).

Example:
    python -m serving.server --model-base-path W/export --model-name recsys_cvae --port 8500
    python -m serving.server --model-config-file models.config --enable-batching \
        --ssl-cert server.crt --ssl-key server.key
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from typing import NoReturn

import grpc
import tensorflow as tf
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.batching import Batcher
from serving.flags import MIB, add_server_arguments, server_kwargs
from serving.servable import (
    DEFAULT_SIGNATURE,
    RpcError,
    Servable,
    first_line,
    invalid,
    output_proto,
    run_signature,
)
from serving.versions import ModelConfig, ModelVersions, read_model_config_file

log = logging.getLogger(__name__)

SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


class ModelServer:
    """Serves the newest version(s) of one or more models over TF Serving's gRPC API.

    Args:
      model_base_path: folder holding integer version folders (each a SavedModel); or None
        with `model_config_file`.
      model_name: the name clients put in `ModelSpec.name`.
      host, port: address to bind; port 0 picks a free port (start() returns it).
      poll_interval_s: how often the base paths are scanned for new versions.
      max_batch_size: largest dimension 0 a request may have (bigger -> INVALID_ARGUMENT).
      max_message_bytes: cap on request and response sizes (bigger -> RESOURCE_EXHAUSTED).
      version_labels: label -> version, answered like TF Serving's `version_labels` config.
      max_workers: threads answering RPCs concurrently.
      rest_api_port: also serve TF Serving's REST API on this port (0: any free port; None:
        no REST). `rest_port` holds the bound port after start().
      model_config_file: TF Serving's ModelServerConfig text proto naming several models
        (instead of model_base_path / model_name / version_labels).
      enable_batching: merge concurrent requests to one signature into one call of up to
        `batch_size` rows, waiting at most `batch_timeout_s` for company.
      ssl_cert, ssl_key: PEM files; when given, gRPC and REST speak TLS only.

    Example:
      server = ModelServer("W/export", port=0)
      port = server.start()
      ...
      server.stop()
    """

    def __init__(
        self, model_base_path: str | None = None, model_name: str = "recsys_cvae",
        host: str = "127.0.0.1", port: int = 8500, poll_interval_s: float = 2.0,
        max_batch_size: int = 1024, max_message_bytes: int = 16 * MIB,
        version_labels: dict[str, int] | None = None, max_workers: int = 8,
        rest_api_port: int | None = None, model_config_file: str | None = None,
        enable_batching: bool = False, batch_size: int = 32, batch_timeout_s: float = 0.002,
        ssl_cert: str | None = None, ssl_key: str | None = None,
    ):
        if (model_base_path is None) == (model_config_file is None):
            raise ValueError("give exactly one of --model-base-path and --model-config-file")
        if (ssl_cert is None) != (ssl_key is None):
            raise ValueError("TLS needs both --ssl-cert and --ssl-key")
        if model_config_file is not None:
            configs = read_model_config_file(model_config_file)
        else:
            configs = [ModelConfig(model_name, model_base_path,
                                   version_labels=dict(version_labels or {}))]
        self.models = {
            c.name: ModelVersions(c, max_batch_size, max_message_bytes) for c in configs}
        self.model_name = configs[0].name
        self.model_base_path = configs[0].base_path
        self.host, self.port = host, port
        self.poll_interval_s = poll_interval_s
        self.max_batch_size = max_batch_size
        self.max_message_bytes = max_message_bytes
        self.max_elements = max_message_bytes
        self.batcher = Batcher(batch_size, batch_timeout_s) if enable_batching else None
        self.ssl_cert, self.ssl_key = ssl_cert, ssl_key
        self._max_workers = max_workers
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self.rest_port = rest_api_port
        self._rest = None
        self._stop_signals: list[int] | None = None  # see catch_stop_signals()

    # -- versions -------------------------------------------------------------------------

    def poll(self) -> None:
        """Loads new versions and unloads old ones for every model (see serving/versions.py)."""
        for model in self.models.values():
            try:
                model.poll()
            except Exception:  # noqa: BLE001  (e.g. a base path vanished; keep serving)
                log.exception("polling %s failed", model.config.base_path)
        serving = all(model.available for model in self.models.values())
        self._set_health(health_pb2.HealthCheckResponse.SERVING if serving
                         else health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status: int) -> None:
        if self._stopping.is_set():
            return
        for service in ("", *SERVICE_NAMES):
            self._health.set(service, status)

    def _poll_loop(self) -> None:
        while not self._stopping.wait(self.poll_interval_s):
            self.poll()

    # -- requests -------------------------------------------------------------------------

    def _model(self, model_spec) -> ModelVersions:
        model = self.models.get(model_spec.name)
        if model is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND,
                           f"Servable not found for request: Latest({model_spec.name})")
        return model

    def resolve(self, model_spec) -> Servable:
        """The servable a ModelSpec asks for, or NOT_FOUND / INVALID_ARGUMENT as TF Serving."""
        return self._model(model_spec).resolve(model_spec)

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Answers one PredictRequest (raises RpcError for requests TF Serving would refuse)."""
        if not request.HasField("model_spec"):
            raise invalid("Missing ModelSpec")
        servable = self.resolve(request.model_spec)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        outputs = run_signature(
            servable, signature_name, request.inputs, request.output_filter,
            self.max_batch_size, self.max_elements, self.batcher,
        )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature_name
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(output_proto(value))
        return response

    def metadata(self, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """Answers GetModelMetadata: the SignatureDefMap packed in an Any, as TF Serving."""
        if not request.HasField("model_spec"):
            raise invalid("Missing ModelSpec")
        if not request.metadata_field:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise invalid(f"Metadata field {field} is not supported")
        servable = self.resolve(request.model_spec)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def status(self, request) -> get_model_status_pb2.GetModelStatusResponse:
        """Answers GetModelStatus: every version this server has seen, with its state."""
        if not request.HasField("model_spec"):
            raise invalid("Missing ModelSpec")
        name = request.model_spec.name
        if name not in self.models:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version, state, code, message in self.models[name].status(request.model_spec):
            entry = response.model_version_status.add(version=version, state=state)
            entry.status.error_code = code
            entry.status.error_message = message
        return response

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> int:
        """Loads the newest versions (if any), binds and starts serving; returns the port."""
        for model in self.models.values():
            if not tf.io.gfile.isdir(model.config.base_path):
                raise FileNotFoundError(f"--model-base-path {model.config.base_path}: not a "
                                        "folder of integer versions")
        credentials = self._server_credentials() if self.ssl_cert else None  # fail early
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.poll()
        for model in self.models.values():
            if not model.available:
                log.warning("no version under %s yet; waiting for one", model.config.base_path)
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(futures.ThreadPoolExecutor(self._max_workers), options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            _PredictionServicer(self), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{self.host}:{self.port}"
        try:
            if credentials is not None:
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot bind {address}: {error}") from None
        server.start()
        self._server = server
        self._poller = threading.Thread(target=self._poll_loop, name="version-poller", daemon=True)
        self._poller.start()
        if self.rest_port is not None:
            from serving.rest import RestServer

            self._rest = RestServer(self, self.host, self.rest_port, self._ssl_context())
            self.rest_port = self._rest.start()
            log.info("REST on %s:%d", self.host, self.rest_port)
        log.info("gRPC on %s:%d, models %s%s", self.host, self.port, ", ".join(self.models),
                 " (TLS)" if self.ssl_cert else "")
        return self.port

    def _server_credentials(self) -> grpc.ServerCredentials:
        pair = []
        for flag, path in (("--ssl-key", self.ssl_key), ("--ssl-cert", self.ssl_cert)):
            try:
                with open(path, "rb") as f:
                    pair.append(f.read())
            except OSError as error:
                raise OSError(
                    f"{flag} {path}: cannot read the PEM file ({error.strerror})") from None
        return grpc.ssl_server_credentials([tuple(pair)])

    def _ssl_context(self):
        if self.ssl_cert is None:
            return None
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ssl_cert, self.ssl_key)
        return context

    def stop(self, grace_s: float | None = 5.0) -> None:
        """Stops accepting requests; those in flight get `grace_s` seconds to finish."""
        self._health.enter_graceful_shutdown()
        self._stopping.set()
        if self.batcher is not None:
            self.batcher.flush()  # waiting batches run now instead of after their timeout
        if self._rest is not None:
            self._rest.stop()
        if self._server is not None:
            self._server.stop(grace_s).wait()
        if self._poller is not None:
            self._poller.join()

    def wait(self) -> None:
        """Blocks until the server stops."""
        if self._server is not None:
            self._server.wait_for_termination()

    def catch_stop_signals(self) -> None:
        """Makes SIGTERM and SIGINT ask for a graceful stop (call from the main thread).

        Call it before announcing the server: a signal sent as soon as the "serving ..." line
        is read then drains the server instead of killing it (the default action). Signals
        that come before `wait_for_signal` are kept, not lost.

        The handler only appends to a list, and must not do more. Python runs a handler in
        the main thread between two bytecodes, possibly while that thread holds the lock the
        handler would take: `Event.set()` in a handler that interrupts the main thread's own
        `Event.wait()` (which holds the Event's condition lock for a few bytecodes on each
        wake-up) blocks forever, so the process answers nothing more and never exits.
        """
        if self._stop_signals is not None:
            return
        received: list[int] = []

        def on_signal(signum, frame):
            received.append(signum)  # lock-free (see the docstring)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        self._stop_signals = received

    def wait_for_signal(self, grace_s: float = 10.0) -> None:
        """Blocks until SIGTERM or SIGINT, then stops gracefully (call from the main thread)."""
        self.catch_stop_signals()
        while not self._stop_signals:
            time.sleep(0.1)  # a lock-free handler cannot wake a wait; 0.1 s is the latency
        log.info("signal %d: stopping (grace %.1fs)", self._stop_signals[0], grace_s)
        self.stop(grace_s)


def _answer(context, call, request):
    """Runs `call(request)`, turning every refusal into a gRPC status (never a crash)."""
    try:
        return call(request)
    except RpcError as error:
        code, message = error.code, error.message
    except Exception as error:  # noqa: BLE001  (a bug here is the server's, say so)
        log.exception("internal error")
        code, message = grpc.StatusCode.INTERNAL, first_line(str(error))
    context.abort(code, message)


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: ModelServer):
        self._server = server

    def Predict(self, request, context):  # noqa: N802  (gRPC method names)
        return _answer(context, self._server.predict, request)

    def GetModelMetadata(self, request, context):  # noqa: N802
        return _answer(context, self._server.metadata, request)

    def _unimplemented(self, context, method: str):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not served: the model has predict signatures only; use Predict",
        )

    def Classify(self, request, context):  # noqa: N802
        self._unimplemented(context, "Classify")

    def Regress(self, request, context):  # noqa: N802
        self._unimplemented(context, "Regress")

    def MultiInference(self, request, context):  # noqa: N802
        self._unimplemented(context, "MultiInference")


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: ModelServer):
        self._server = server

    def GetModelStatus(self, request, context):  # noqa: N802
        return _answer(context, self._server.status, request)

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "the served models come from the command line; restart the server to change them",
        )


def serve(model_base_path: str | None = None, **kwargs) -> ModelServer:
    """Starts a ModelServer (same arguments) and returns it (`.port`, `.wait_for_signal()`)."""
    server = ModelServer(model_base_path, **kwargs)
    server.start()
    return server

def describe(server: ModelServer) -> str:
    """The one line printed once serving: models, gRPC address and REST port."""
    rest = f", REST on {server.host}:{server.rest_port}" if server.rest_port is not None else ""
    tls = " (TLS)" if server.ssl_cert else ""
    return f"serving {', '.join(server.models)} on {server.host}:{server.port}{rest}{tls}"


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.server --model-base-path W/export [--port 8500] ...`"""
    parser = argparse.ArgumentParser(prog="serving.server", description=__doc__.splitlines()[0])
    parser.add_argument("--model-base-path", help="folder of integer versions")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = ModelServer(args.model_base_path, **server_kwargs(args))
        server.catch_stop_signals()  # before the line below: a SIGTERM right after it drains
        server.start()
    except (OSError, ValueError) as error:
        print(f"serving.server: {error}", file=sys.stderr)
        return 1
    print(describe(server), flush=True)
    server.wait_for_signal(args.grace_s)
    exit_after_stop(0)


def exit_after_stop(status: int) -> NoReturn:
    """Ends the process now, once a graceful stop has completed, skipping interpreter teardown.

    Why: after `stop()` nothing is left to do (every request is answered, the listeners are
    closed, the worker threads idle), yet a normal exit then spends 1-5 s, 12 s on a loaded
    2-core machine, in the garbage collector freeing TensorFlow's object graph (TF, SciPy,
    pandas modules) one object at a time. That time counts against the orchestrator's
    termination grace period (and the tests' exit timeout) for no benefit. Logs and stdio
    are flushed first; atexit handlers do not run, so call this only from the command line
    entry point, never from a library or a notebook.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
