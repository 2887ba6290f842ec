"""The gRPC services the embedded server registers: TF Serving's PredictionService and
ModelService, plus the standard health service.

Why a module of its own: these classes are the wire adapters only. Each RPC hands its request
to a plain function (the ModelServer's `predict`, `metadata`, `status`) and turns whatever that
raises into the gRPC status TF Serving would send, so the request logic in `serving/server.py`
and `serving/servable.py` stays free of `grpc.ServicerContext` and is shared with the REST API.
They take the answering functions rather than the ModelServer, so this module does not depend
on `serving/server.py` (which builds the gRPC server through `grpc_server` below).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving import metrics as M
from serving.servable import RpcError, first_line

log = logging.getLogger(__name__)

# The services whose health is reported by name (besides "", the whole server).
SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")

Answer = Callable[[Any], Any]  # request proto -> response proto; raises RpcError for a refusal


def answer_rpc(context: grpc.ServicerContext, call: Answer, request,
               refused: Callable[[grpc.StatusCode], None] | None = None):
    """Runs `call(request)`, turning every refusal into a gRPC status (never a crash);
    `refused(code)` is told the status first (the request count)."""
    try:
        return call(request)
    except RpcError as error:
        code, message = error.code, error.message
    except Exception as error:  # noqa: BLE001  (a bug here is the server's, say so)
        log.exception("internal error")
        code, message = grpc.StatusCode.INTERNAL, first_line(str(error))
    if refused is not None:
        refused(code)
    context.abort(code, message)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`tensorflow.serving.PredictionService`: Predict and GetModelMetadata; the rest refused.

    Classify, Regress and MultiInference answer UNIMPLEMENTED: the export has predict
    signatures only.
    """

    def __init__(self, predict: Answer, metadata: Answer):
        self._predict = predict
        self._metadata = metadata

    def Predict(self, request, context):  # noqa: N802  (gRPC method names)
        # prediction_service_impl.cc: the latency of successful calls, a count of every call
        started = time.perf_counter()
        name = request.model_spec.name
        response = answer_rpc(context, self._predict, request,
                              refused=lambda code: M.REQUEST_COUNT.increment(name, code.name))
        M.REQUEST_LATENCY.add((time.perf_counter() - started) * 1e6, name, "Predict", "GRPC")
        M.REQUEST_COUNT.increment(name, "OK")
        return response

    def GetModelMetadata(self, request, context):  # noqa: N802
        return answer_rpc(context, self._metadata, request)

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


class ModelStatusServicer(model_service_pb2_grpc.ModelServiceServicer):
    """`tensorflow.serving.ModelService`: GetModelStatus; reloading the config is refused
    (the models come from the command line)."""

    def __init__(self, status: Answer):
        self._status = status

    def GetModelStatus(self, request, context):  # noqa: N802
        return answer_rpc(context, self._status, request)

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "the served models come from the command line; restart the server to change them",
        )


def grpc_server(
    predict: Answer, metadata: Answer, status: Answer, health_servicer: health.HealthServicer,
    max_workers: int, max_message_bytes: int,
) -> grpc.Server:
    """An unbound, unstarted gRPC server with the three services registered.

    Messages are capped at `max_message_bytes` both ways (bigger -> RESOURCE_EXHAUSTED), and
    SO_REUSEPORT is off so that binding a port another server holds fails instead of sharing it.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers), options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(predict, metadata), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelStatusServicer(status), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server
