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
Request validation (which request is refused, with which code) lives in `serving/servable.py`,
the gRPC service classes in `serving/grpc_services.py`, and the process-facing steps (TLS files,
binding, stop signals) in `serving/lifecycle.py`; this module resolves models and answers
requests, and owns the start/stop order.

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
import sys
import threading
import time
from typing import NoReturn

import grpc
import numpy as np
import tensorflow as tf
from grpc_health.v1 import health, health_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from serving import metrics as M
from serving.batching import Batcher, read_batching_parameters
from serving.flags import MIB, add_server_arguments, server_kwargs
from serving.grpc_services import SERVICE_NAMES, grpc_server
from serving.lifecycle import StopSignals, bind_grpc, grpc_credentials, rest_ssl_context
from serving.request_log import RequestLogger
from serving.rest import RestServer
from serving.servable import (
    DEFAULT_SIGNATURE,
    RpcError,
    Servable,
    invalid,
    output_proto,
    run_signature,
)
from serving.tensor_protos import to_tensor_proto
from serving.versions import ModelConfig, ModelVersions, read_model_config_file

log = logging.getLogger(__name__)


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
      ssl_client_ca: PEM CA; clients must present a certificate it signed (mutual TLS).
      rest_api_num_threads, rest_api_timeout_s: REST requests answered at once (0:
        `rest.DEFAULT_REST_THREADS`) and how long a connection may idle or take to send a request
        (`http_connections.PooledHTTPServer`).
      batching_parameters_file: TF Serving's BatchingParameters text file (with
        enable_batching, instead of batch_size / batch_timeout_s).
      max_num_load_retries, load_retry_interval_s: a version that fails to load is tried
        again this many times, this far apart (`versions.ModelVersions`).
      monitoring_config_file: TF Serving's MonitoringConfig text proto; with
        `prometheus_config { enable: true }` the REST port serves `serving.metrics`' page.

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
        ssl_cert: str | None = None, ssl_key: str | None = None, ssl_client_ca: str | None = None,
        rest_api_num_threads: int = 0, rest_api_timeout_s: float = 30.0,
        monitoring_config_file: str | None = None,
        max_num_load_retries: int = 5, load_retry_interval_s: float = 60.0,
        batching_parameters_file: str | None = None,
    ):
        if (model_base_path is None) == (model_config_file is None):
            raise ValueError("give exactly one of --model-base-path and --model-config-file")
        if ssl_client_ca is not None and ssl_cert is None:
            raise ValueError("--ssl-client-ca needs --ssl-cert and --ssl-key (mutual TLS)")
        if (ssl_cert is None) != (ssl_key is None):
            raise ValueError("TLS needs both --ssl-cert and --ssl-key")
        if model_config_file is not None:
            configs = read_model_config_file(model_config_file)
        else:
            configs = [ModelConfig(model_name, model_base_path,
                                   version_labels=dict(version_labels or {}))]
        self.models = {
            c.name: ModelVersions(c, max_batch_size, max_message_bytes, max_num_load_retries,
                                  load_retry_interval_s) for c in configs}
        # logging_config of each model: sampled Predict calls as PredictionLog records
        self.request_logs = {c.name: RequestLogger(c.name, c.log_sampling_rate,
                                                   c.log_filename_prefix)
                             for c in configs if c.log_sampling_rate > 0}
        self.model_name = configs[0].name
        self.model_base_path = configs[0].base_path
        self.host, self.port = host, port
        self.poll_interval_s = poll_interval_s
        self.max_batch_size = max_batch_size
        self.max_message_bytes = max_message_bytes
        self.max_elements = max_message_bytes
        if batching_parameters_file and not enable_batching:
            raise ValueError(f"{batching_parameters_file}: batching parameters apply with "
                             "--enable-batching; add it")
        self.batcher = None
        if enable_batching:
            self.batcher = (Batcher(**read_batching_parameters(batching_parameters_file))
                            if batching_parameters_file else Batcher(batch_size, batch_timeout_s))
        self.ssl_cert, self.ssl_key, self.ssl_client_ca = ssl_cert, ssl_key, ssl_client_ca
        self._max_workers = max_workers
        self._stopping = threading.Event()
        self._poller: threading.Thread | None = None
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self.rest_port = rest_api_port
        self._rest_threads, self._rest_timeout_s = rest_api_num_threads, rest_api_timeout_s
        self.metrics_path = (M.read_monitoring_config(monitoring_config_file)
                             if monitoring_config_file else None)
        if self.metrics_path and rest_api_port is None:
            raise ValueError(f"{monitoring_config_file}: Prometheus metrics are served on the "
                             "REST port; add --rest-api-port")
        self._rest: RestServer | None = None
        self._stop_signals = StopSignals()

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
        return _response(request, *self.run_predict(request))

    def run_predict(self, request: predict_pb2.PredictRequest,
                    arrays: dict[str, np.ndarray] | None = None):
        """(servable, signature name, output name -> numpy array) of one PredictRequest: what
        `predict` answers, before its outputs become TensorProtos (REST writes JSON from the
        arrays directly).

        `arrays`: the inputs already decoded (REST's JSON), in place of `request.inputs`;
        they are checked against the signature just the same, and become TensorProtos only
        if this call is sampled into the request log.
        """
        if not request.HasField("model_spec"):
            raise invalid("Missing ModelSpec")
        servable = self.resolve(request.model_spec)
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        started = time.perf_counter()
        outputs = run_signature(
            servable, signature_name, request.inputs if arrays is None else arrays,
            request.output_filter, self.max_batch_size, self.max_elements, self.batcher,
        )
        # predict_util.cc records the runtime's wall time as runtime "TF1" (a SavedModel session)
        M.RUNTIME_LATENCY.add((time.perf_counter() - started) * 1e6, request.model_spec.name,
                              "Predict", "TF1")
        logger = self.request_logs.get(request.model_spec.name)
        if logger is not None and logger.sampled():
            if arrays is not None:
                request = _with_inputs(request, arrays)
            logger.write(request, _response(request, servable, signature_name, outputs))
        return servable, signature_name, outputs

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
        """Loads the newest versions (if any), binds and starts serving; returns the port.

        The order matters: bad flags (missing base path, unreadable PEM files) fail before the
        slow first load, and a port that cannot be bound leaves no poller thread behind.
        """
        self._check_base_paths()
        credentials = (grpc_credentials(self.ssl_cert, self.ssl_key, self.ssl_client_ca)
                       if self.ssl_cert else None)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._load_first_versions()
        self._start_grpc(credentials)
        self._poller = threading.Thread(target=self._poll_loop, name="version-poller", daemon=True)
        self._poller.start()
        if self.rest_port is not None:
            self._start_rest()
        log.info("gRPC on %s:%d, models %s%s", self.host, self.port, ", ".join(self.models),
                 " (TLS)" if self.ssl_cert else "")
        return self.port

    def _check_base_paths(self) -> None:
        for model in self.models.values():
            if not tf.io.gfile.isdir(model.config.base_path):
                raise FileNotFoundError(f"--model-base-path {model.config.base_path}: not a "
                                        "folder of integer versions")

    def _load_first_versions(self) -> None:
        self.poll()
        for model in self.models.values():
            if not model.available:
                log.warning("no version under %s yet; waiting for one", model.config.base_path)

    def _start_grpc(self, credentials: grpc.ServerCredentials | None) -> None:
        server = grpc_server(self.predict, self.metadata, self.status, self._health,
                             self._max_workers, self.max_message_bytes)
        self.port = bind_grpc(server, f"{self.host}:{self.port}", credentials)
        server.start()
        self._server = server

    def _start_rest(self) -> None:
        context = rest_ssl_context(self.ssl_cert, self.ssl_key, self.ssl_client_ca)
        self._rest = RestServer(self, self.host, self.rest_port, context,
                                num_threads=self._rest_threads, timeout_s=self._rest_timeout_s,
                                metrics_path=self.metrics_path)
        self.rest_port = self._rest.start()
        log.info("REST on %s:%d", self.host, self.rest_port)

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
        for logger in self.request_logs.values():
            logger.close()

    def wait(self) -> None:
        """Blocks until the server stops."""
        if self._server is not None:
            self._server.wait_for_termination()

    def catch_stop_signals(self) -> None:
        """Makes SIGTERM and SIGINT ask for a graceful stop (call from the main thread).

        Call it before announcing the server: a signal sent as soon as the "serving ..." line
        is read then drains the server instead of killing it (the default action). Signals
        that come before `wait_for_signal` are kept, not lost. Why the handler does no more
        than record the signal: see `serving.lifecycle.StopSignals`.
        """
        self._stop_signals.catch()

    def wait_for_signal(self, grace_s: float = 10.0) -> None:
        """Blocks until SIGTERM or SIGINT, then stops gracefully (call from the main thread)."""
        signum = self._stop_signals.wait()
        log.info("signal %d: stopping (grace %.1fs)", signum, grace_s)
        self.stop(grace_s)


def serve(model_base_path: str | None = None, **kwargs) -> ModelServer:
    """Starts a ModelServer (same arguments) and returns it (`.port`, `.wait_for_signal()`)."""
    server = ModelServer(model_base_path, **kwargs)
    server.start()
    return server


def _with_inputs(request, arrays: dict[str, np.ndarray]) -> predict_pb2.PredictRequest:
    """A copy of `request` carrying `arrays` as its input TensorProtos."""
    logged = predict_pb2.PredictRequest()
    logged.CopyFrom(request)
    for key, array in arrays.items():
        logged.inputs[key].CopyFrom(to_tensor_proto(array))
    return logged


def _response(request, servable, signature_name: str, outputs) -> predict_pb2.PredictResponse:
    """The PredictResponse of a call `ModelServer.run_predict` answered."""
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature_name
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(output_proto(value))
    return response


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
