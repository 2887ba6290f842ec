"""TF Serving's metrics, and the Prometheus page `--monitoring-config-file` turns on.

Why TF Serving's names and buckets, not our own: dashboards and alerts written for
`tensorflow_model_server` must work unchanged. Names, labels and bucket layouts follow
tensorflow_serving/servables/tensorflow/util.cc (request_count, request_latency,
runtime_latency, request_example_counts), saved_model_warmup_util.cc (model_warmup_latency)
and TensorFlow's SavedModel loader (load_attempt_count, load_latency); the page is written as
util/prometheus_exporter.cc writes it: `/tensorflow/serving/request_count` becomes
`:tensorflow:serving:request_count`, histograms as cumulative `_bucket{le=...}` lines with the
last limit `+Inf`, then `_sum` and `_count`. Latencies are in microseconds, as there.

The registry is process-wide, like TensorFlow's CollectionRegistry::Default().
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

from google.protobuf import descriptor_pb2

from serving.text_protos import message_class, read_text_proto

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath


def exponential_buckets(scale: float, growth: float, count: int) -> list[float]:
    """`monitoring::Buckets::Exponential`: scale · growth^i for i < count (then +Inf)."""
    return [scale * growth**i for i in range(count)]


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str]) -> None:
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self._lock = threading.Lock()
        self._cells: dict[tuple[str, ...], object] = {}
        REGISTRY.append(self)

    @property
    def prometheus_name(self) -> str:
        """`GetPrometheusMetricName`: every character but [a-zA-Z0-9_] becomes ':'."""
        name = re.sub(r"[^a-zA-Z0-9_]", ":", self.name)
        return "_" + name if name[:1].isdigit() else name

    def _label_text(self, values: tuple[str, ...]) -> str:
        def escape(value: str) -> str:  # SanitizeLabelValue
            return value.replace("\\", "\\\\").replace('"', '\\"')

        return ",".join(f'{re.sub(r"[^a-zA-Z0-9]", "_", name)}="{escape(value)}"'
                        for name, value in zip(self.labels, values))


class Counter(_Metric):
    """`monitoring::Counter<N>`: a count per label combination."""

    kind = "counter"

    def increment(self, *values: str, by: int = 1) -> None:
        with self._lock:
            self._cells[values] = self._cells.get(values, 0) + by

    def value(self, *values: str) -> int:
        return self._cells.get(values, 0)

    def lines(self) -> list[str]:
        out = [f"# TYPE {self.prometheus_name} counter"]
        with self._lock:
            cells = sorted(self._cells.items())
        out += [f"{self.prometheus_name}{{{self._label_text(k)}}} {v}" for k, v in cells]
        return out


class Histogram(_Metric):
    """`monitoring::Sampler<N>`: bucket counts, sum and count per label combination."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str],
                 limits: Sequence[float]) -> None:
        super().__init__(name, help_text, labels)
        self.limits = list(limits)

    def add(self, value: float, *values: str) -> None:
        index = next((i for i, limit in enumerate(self.limits) if value < limit),
                     len(self.limits))
        with self._lock:
            counts, total = self._cells.get(values, ([0] * (len(self.limits) + 1), 0.0))
            counts = list(counts)
            counts[index] += 1
            self._cells[values] = (counts, total + value)

    def lines(self) -> list[str]:
        name = self.prometheus_name
        out = [f"# TYPE {name} histogram"]
        with self._lock:
            cells = sorted(self._cells.items())
        for values, (counts, total) in cells:
            labels = self._label_text(values)
            prefix = f"{name}_bucket{{{labels}{',' if labels else ''}"
            cumulative = 0
            for i, count in enumerate(counts):
                cumulative += count
                limit = f"{self.limits[i]:.6g}" if i < len(self.limits) else "+Inf"
                out.append(f'{prefix}le="{limit}"}} {cumulative}')
            out.append(f"{name}_sum{{{labels}}} {total:.6g}")
            out.append(f"{name}_count{{{labels}}} {cumulative}")
        return out


REGISTRY: list[_Metric] = []
_LATENCY_BUCKETS = exponential_buckets(10, 1.8, 33)  # "Scale of 10, power of 1.8 ..., 33"

REQUEST_COUNT = Counter("/tensorflow/serving/request_count", "The total number of requests.",
                        ("model_name", "status"))
REQUEST_LATENCY = Histogram(
    "/tensorflow/serving/request_latency",
    "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
    ("model_name", "API", "entrypoint"), _LATENCY_BUCKETS)
RUNTIME_LATENCY = Histogram(
    "/tensorflow/serving/runtime_latency",
    "Distribution of wall time (in microseconds) for Tensorflow runtime.",
    ("model_name", "API", "runtime"), _LATENCY_BUCKETS)
REQUEST_EXAMPLE_COUNTS = Histogram(  # tf.Example inputs only (Classify/Regress): none here
    "/tensorflow/serving/request_example_counts",
    "The number of tensorflow.Examples per request.", ("model",),
    exponential_buckets(1, 2, 15))
WARMUP_LATENCY = Histogram(
    "/tensorflow/serving/model_warmup_latency",
    "Distribution of wall time (in microseconds) for warming up the model.",
    ("model_path", "status"), _LATENCY_BUCKETS)
LOAD_ATTEMPTS = Counter("/tensorflow/cc/saved_model/load_attempt_count",
                        "The number of times a SavedModel was successfully loaded.",
                        ("model_path", "status"))
LOAD_LATENCY = Counter("/tensorflow/cc/saved_model/load_latency",
                       "Latency in microseconds for SavedModels that were successfully loaded.",
                       ("model_path",))
# Ours (TF Serving has no such metric): versions unloaded by the version policy or because
# their folder disappeared.
UNLOADS = Counter("/recsys_cvae/serving/model_unload_count",
                  "The number of model versions unloaded.", ("model_name",))


def prometheus_page() -> str:
    """Every registered metric in Prometheus' text format (`PrometheusExporter::GeneratePage`)."""
    lines = [line for metric in REGISTRY for line in metric.lines()]
    return "\n".join(lines) + "\n"


# ---- --monitoring-config-file ----------------------------------------------------------------

def _monitoring_config_class() -> type:
    """tensorflow_serving/config/monitoring_config.proto's MonitoringConfig."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="recsys_cvae/monitoring_config.proto", package="tensorflow.serving",
        syntax="proto3")
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=8, label=1)  # bool
    prometheus.field.add(name="path", number=2, type=9, label=1)  # string
    monitoring = proto.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1, type=11, label=1,
                         type_name=".tensorflow.serving.PrometheusConfig")
    return message_class(proto, "tensorflow.serving.MonitoringConfig")


def read_monitoring_config(path: str) -> str | None:
    """The Prometheus path a MonitoringConfig text file enables (its `path`, default
    PROMETHEUS_PATH), or None when it does not enable Prometheus.

    Raises:
      ValueError: the file is unreadable or not a MonitoringConfig (one line naming it).
    """
    config = read_text_proto(path, _monitoring_config_class(), "monitoring config")
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or PROMETHEUS_PATH
