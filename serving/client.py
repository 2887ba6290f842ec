"""A client for the recommender over TF Serving's gRPC API (official tensorflow-serving-api stubs).

Why a client class rather than raw stubs: a Predict call needs TensorProtos of the right dtypes,
histories padded to one width, and outputs read back by the signature's keys. The client learns
the signatures once from GetModelMetadata (so attribute dtypes come from the model, not from
code here), and adds deadlines and retries. It works the same against `serving.server` and a
real `tensorflow_model_server`.

Example:
    with RecommenderClient("127.0.0.1:8500") as client:
        recs = client.recommend([["i1", "i7"]], {"region": ["north"], "age": [34]})
        print(format_recommendations(recs))
"""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.flags import MIB
from serving.tensor_protos import dtype_name, numpy_dtype, to_ndarray, to_tensor_proto

HISTORY_INPUT = "item_ids"

_STATE_NAMES = dict(get_model_status_pb2.ModelVersionStatus.State.items())
_STATE_NAMES = {value: name for name, value in _STATE_NAMES.items()}


class ServingError(RuntimeError):
    """A failed RPC: `code` is the grpc.StatusCode, the message reads `CODE: details`."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class RecommenderClient:
    """Calls `recommend`, `generate` and `encode` on a served recsys-cvae model.

    Args:
      target: server address, "host:port".
      model_name: the served model's name (`--model-name` of the server).
      timeout_s: deadline of each RPC attempt.
      retries: extra attempts after UNAVAILABLE (server not up yet, connection reset); every
        other status is final. Waits 0.2 s, 0.4 s, ... between attempts.
      version: ask for this model version instead of the newest.
      max_message_bytes: cap on request and response sizes.
      tls: connect over TLS (as to a server started with --ssl-cert/--ssl-key).
      root_certificates: PEM file of the CA (or self-signed certificate) to trust; implies
        TLS; without it, TLS trusts the system's roots.
    """

    def __init__(
        self, target: str, model_name: str = "recsys_cvae", timeout_s: float = 5.0,
        retries: int = 2, version: int | None = None, max_message_bytes: int = 16 * MIB,
        backoff_s: float = 0.2, tls: bool = False, root_certificates: str | None = None,
    ):
        self.target = target
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.retries = retries
        self.version = version
        self.backoff_s = backoff_s
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls or root_certificates:
            self._channel = grpc.secure_channel(
                target, _tls_credentials(root_certificates), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._signatures: dict | None = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- RPC plumbing ---------------------------------------------------------------------

    def _call(self, method, request):
        """One RPC with a deadline, retried with exponential backoff on UNAVAILABLE only."""
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s)
            except grpc.RpcError as error:
                code = error.code()
                if code != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise ServingError(code, error.details() or "") from None
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _model_spec(self, spec, signature_name: str = "") -> None:
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = self.version
        if signature_name:
            spec.signature_name = signature_name

    # -- metadata and status --------------------------------------------------------------

    def metadata(self) -> dict:
        """The served model's signatures, as plain data (cached after the first call).

        Returns:
          {"model": name, "version": int, "signatures": {key: {"method_name": str,
          "inputs": {name: {"dtype": "string", "shape": [-1, -1]}}, "outputs": {...}}}};
          internal signatures (keys starting "__") are left out.
        """
        if self._signatures is None:
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                metadata_field=["signature_def"])
            self._model_spec(request.model_spec)
            response = self._call(self._predict.GetModelMetadata, request)
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_map)
            self._signatures = {
                "model": response.model_spec.name,
                "version": response.model_spec.version.value,
                "signatures": {
                    key: {
                        "method_name": sig.method_name,
                        "inputs": _tensor_infos(sig.inputs),
                        "outputs": _tensor_infos(sig.outputs),
                    }
                    for key, sig in sorted(signature_map.signature_def.items())
                    if not key.startswith("__")
                },
            }
        return self._signatures

    def status(self) -> list[dict]:
        """Every version the server knows: [{"version", "state", "error_code", "error"}]."""
        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec)
        response = self._call(self._models.GetModelStatus, request)
        return [
            {
                "version": entry.version,
                "state": _STATE_NAMES.get(entry.state, str(entry.state)),
                "error_code": entry.status.error_code,
                "error": entry.status.error_message,
            }
            for entry in response.model_version_status
        ]

    # -- signatures -----------------------------------------------------------------------

    def predict(self, signature_name: str, inputs: dict[str, np.ndarray],
                output_filter: list[str] | None = None) -> dict[str, np.ndarray]:
        """Any signature with numpy inputs; returns output key -> numpy array."""
        request = predict_pb2.PredictRequest(output_filter=output_filter or [])
        self._model_spec(request.model_spec, signature_name)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(to_tensor_proto(value))
        response = self._call(self._predict.Predict, request)
        return {key: to_ndarray(proto) for key, proto in response.outputs.items()}

    def recommend(
        self, histories: list[list[str]], attributes: dict[str, list]
    ) -> list[list[tuple[str, float]]]:
        """Top-K (item_id, score) per user from history + attributes, best first.

        Args:
          histories: per user, the item ids seen (any lengths; padded with "").
          attributes: attribute name -> one value per user; a missing attribute or a None/""
            value means unknown.
        """
        outputs = self.predict("recommend", self._inputs("recommend", histories, attributes))
        return _ranked(outputs)

    def generate(self, attributes: dict[str, list]) -> list[list[tuple[str, float]]]:
        """Top-K (item_id, score) per user from attributes alone (cold start, what-if)."""
        return _ranked(self.predict("generate", self._inputs("generate", None, attributes)))

    def encode(
        self, histories: list[list[str]], attributes: dict[str, list]
    ) -> dict[str, np.ndarray]:
        """The user embedding: {"z_mean": [batch, d], "z_log_var": [batch, d]} float32."""
        return self.predict("encode", self._inputs("encode", histories, attributes))

    def _inputs(
        self, signature_name: str, histories: list[list[str]] | None, attributes: dict[str, list]
    ) -> dict[str, np.ndarray]:
        """Builds the signature's inputs, with dtypes taken from its metadata."""
        signatures = self.metadata()["signatures"]
        if signature_name not in signatures:
            raise ValueError(
                f"model {self.model_name} has no signature {signature_name!r}; "
                f"it has: {', '.join(sorted(signatures))}"
            )
        specs = signatures[signature_name]["inputs"]
        attribute_specs = {k: v for k, v in specs.items() if k != HISTORY_INPUT}
        unknown = sorted(set(attributes) - set(attribute_specs))
        if unknown:
            raise ValueError(
                f"unknown attribute(s) {', '.join(unknown)}; the model expects: "
                f"{', '.join(sorted(attribute_specs))}"
            )
        sizes = {len(values) for values in attributes.values()}
        if histories is not None:
            sizes.add(len(histories))
        if len(sizes) != 1:
            raise ValueError(
                "histories and every attribute need one entry per user; got lengths "
                f"{sorted(sizes) if sizes else 'none (pass at least one attribute)'}"
            )
        batch = sizes.pop()
        inputs = {}
        if HISTORY_INPUT in specs:
            inputs[HISTORY_INPUT] = _pad_histories(histories or [[] for _ in range(batch)])
        for name, spec in attribute_specs.items():
            values = attributes.get(name, [None] * batch)
            inputs[name] = _attribute_array(name, values, spec["dtype"])
        return inputs


def _tls_credentials(root_certificates: str | None) -> grpc.ChannelCredentials:
    if root_certificates is None:
        return grpc.ssl_channel_credentials()
    try:
        with open(root_certificates, "rb") as f:
            return grpc.ssl_channel_credentials(root_certificates=f.read())
    except OSError as error:
        raise ValueError(
            f"root certificates {root_certificates}: cannot read the PEM file ({error.strerror})"
        ) from None


def _tensor_infos(infos) -> dict[str, dict]:
    return {
        key: {
            "dtype": dtype_name(info.dtype),
            "shape": None if info.tensor_shape.unknown_rank
            else [d.size for d in info.tensor_shape.dim],
        }
        for key, info in sorted(infos.items())
    }


def _pad_histories(histories: list[list[str]]) -> np.ndarray:
    """[batch] lists of ids -> [batch, longest] bytes array, "" padding."""
    width = max((len(h) for h in histories), default=0)
    array = np.full((len(histories), width), b"", dtype=object)
    for row, history in enumerate(histories):
        array[row, : len(history)] = [str(item).encode() for item in history]
    return array


def _attribute_array(name: str, values: list, dtype: str) -> np.ndarray:
    """One attribute's values -> [batch] array of the signature's dtype (None/"" = unknown)."""
    if dtype == "string":
        return np.array(
            [b"" if v is None else str(v).encode() for v in values], dtype=object
        ).reshape(len(values))
    if dtype.startswith("float"):
        out = []
        for value in values:
            if value is None or value == "":
                out.append(math.nan)
                continue
            try:
                out.append(float(value))
            except (TypeError, ValueError):
                raise ValueError(f"attribute {name}: expected a number, got {value!r}") from None
        return np.array(out, dtype=numpy_dtype(dtype))
    if dtype.startswith("int"):
        try:
            integers = [int(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"attribute {name}: expected integers, got {values!r}") from None
        return np.array(integers, dtype=numpy_dtype(dtype))
    raise ValueError(f"attribute {name}: unsupported input dtype {dtype}")


def _ranked(outputs: dict[str, np.ndarray]) -> list[list[tuple[str, float]]]:
    """item_ids [batch, K] + scores [batch, K] -> per user [(item_id, score)], best first.

    Slots the model could not fill (empty id or non-finite score) are dropped.
    """
    ranked = []
    for ids, scores in zip(outputs["item_ids"], outputs["scores"]):
        ranked.append([
            (item.decode(), float(score))
            for item, score in zip(ids, scores)
            if item and math.isfinite(score)
        ])
    return ranked


def format_recommendations(
    recommendations: list[list[tuple[str, float]]], user_labels: list[str] | None = None
) -> str:
    """A readable table: one block per user, one `rank item_id score` line per item."""
    labels = user_labels or [f"user {i}" for i in range(len(recommendations))]
    lines = []
    for label, ranked in zip(labels, recommendations):
        lines.append(f"{label}:")
        if not ranked:
            lines.append("  (no recommendations)")
        width = max((len(item) for item, _ in ranked), default=0)
        lines.extend(
            f"  {rank:>3}  {item:<{width}}  {score:.4f}"
            for rank, (item, score) in enumerate(ranked, start=1)
        )
    return "\n".join(lines)


def format_encoding(outputs: dict[str, np.ndarray]) -> str:
    """`z_mean` / `z_log_var` rows, one line per user and output."""
    lines = []
    for key in sorted(outputs):
        for row, values in enumerate(np.asarray(outputs[key])):
            numbers = " ".join(f"{v:.4f}" for v in np.ravel(values))
            lines.append(f"user {row} {key}: {numbers}")
    return "\n".join(lines)


def query(
    target: str, model_name: str, signature: str, items: list[str],
    attributes: dict[str, str], timeout_s: float = 5.0, tls: bool = False,
    root_certificates: str | None = None, k: int = 0,
) -> str:
    """One call for `recsys-cvae query`: one user, the printable answer.

    Args:
      signature: "recommend", "generate" or "encode".
      items: the user's history (ignored by generate).
      attributes: name -> value as typed on the command line ("34" for a numeric attribute).
      tls, root_certificates: as for RecommenderClient.
      k: print the first k items only (0: all the signature returns).
    """
    def top(ranked: list[list[tuple[str, float]]]) -> str:
        return format_recommendations([r[:k] if k else r for r in ranked])

    with RecommenderClient(target, model_name=model_name, timeout_s=timeout_s, tls=tls,
                           root_certificates=root_certificates) as client:
        one_user = {name: [value] for name, value in attributes.items()}
        if signature == "recommend":
            return top(client.recommend([items], one_user))
        if signature == "generate":
            if not one_user:
                one_user = {_first_attribute(client, "generate"): [None]}
            return top(client.generate(one_user))
        if signature == "encode":
            return format_encoding(client.encode([items], one_user))
    raise ValueError(f"signature must be recommend, generate or encode, got {signature!r}")


def _first_attribute(client: RecommenderClient, signature: str) -> str:
    inputs = client.metadata()["signatures"][signature]["inputs"]
    names = [name for name in inputs if name != HISTORY_INPUT]
    if not names:
        raise ValueError(f"signature {signature} has no attribute inputs")
    return names[0]
