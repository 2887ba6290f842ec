"""Sampled request logging, as TF Serving's `logging_config` in `--model-config-file`.

    model_config_list { config { name: "recsys_cvae" base_path: "/models/recsys_cvae"
      logging_config {
        sampling_config { sampling_rate: 0.01 }
        log_collector_config { filename_prefix: "/logs/recsys_cvae" }
      } } }

Why this format: each sampled Predict call is written as a `PredictionLog` (its
PredictRequest and PredictResponse) in a TFRecord file, the format of the SavedModel warmup
file (`assets.extra/tf_serving_warmup_requests`), so a log can be replayed as warmup, fed to
a monitoring job, or read with `tf.data.TFRecordDataset`. TF Serving leaves the writer to a
registered log collector; here there is one, and `log_collector_config.type` is not read.
Files are `<filename_prefix>.<start time>.<pid>.tfrecord`; records are flushed as written.
"""

from __future__ import annotations

import os
import random
import threading
import time

from serving import metrics as M

LOG_COUNT = M.Counter("/tensorflow/serving/request_log_count",
                      "The total number of requests logged from the model server sliced "
                      "down by model_name and status code.", ("model_name", "status"))


class RequestLogger:
    """Writes a `sampling_rate` share of one model's Predict calls to a TFRecord file.

    Args:
      model_name: the model the records are counted under.
      sampling_rate: probability that a call is logged (0 < rate <= 1).
      filename_prefix: path prefix of the log file (its folder is created).
      seed: seeds the sampling, for tests.
    """

    def __init__(self, model_name: str, sampling_rate: float, filename_prefix: str,
                 seed: int | None = None) -> None:
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"logging_config of {model_name}: sampling_rate must be in (0, 1], "
                             f"got {sampling_rate}")
        if not filename_prefix:
            raise ValueError(f"logging_config of {model_name}: log_collector_config needs a "
                             "filename_prefix")
        self.model_name, self.sampling_rate = model_name, sampling_rate
        self.path = f"{filename_prefix}.{int(time.time())}.{os.getpid()}.tfrecord"
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._writer = None

    def sampled(self) -> bool:
        with self._lock:
            return self._random.random() < self.sampling_rate

    def write(self, request, response) -> None:
        """Appends one PredictionLog (call only for a sampled call: `sampled()`)."""
        # deferred: the protos and TFRecord writer load with TensorFlow, already imported by
        # the server that calls this
        import tensorflow as tf
        from tensorflow_serving.apis import prediction_log_pb2

        record = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request, response=response))
        with self._lock:
            if self._writer is None:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self._writer = tf.io.TFRecordWriter(self.path)
            self._writer.write(record.SerializeToString())
            self._writer.flush()
        LOG_COUNT.increment(self.model_name, "OK")

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
