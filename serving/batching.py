"""Server-side batching: concurrent small requests to one signature run as one model call.

Why: a signature call has a fixed cost (graph dispatch, Python ↔ C++ crossings) that dwarfs
the per-row cost at batch 1. When many clients send one user each, merging their requests
along dimension 0 spends that cost once per batch, as TF Serving's `--enable_batching` does
(`batch_timeout_micros`, `max_batch_size` of its batching parameters).

How (leader/follower, no extra threads): the first request to arrive for a batch key opens a
batch and becomes its leader; requests arriving while it is open join it. The leader waits
until the batch holds `max_batch_size` rows or `timeout_s` has passed, then concatenates the
inputs (each [n_i, ...] -> [sum n_i, ...]), calls the signature once and hands every member its
rows of each output ([sum n_i, ...] -> [n_i, ...]). A batch key is (servable, signature,
every input's dtype and shape without dimension 0), so only requests that concatenate are
merged; an empty request runs alone, and one with more than `max_batch_size` rows is split
into pieces of at most `max_batch_size` rows that are batched like any other request and
joined again (TF Serving's `enable_large_batch_splitting`; off: it runs alone, unsplit).
`flush()` (on shutdown) ends every wait at once, so draining does not wait for timeouts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
from google.protobuf import descriptor_pb2, wrappers_pb2

from serving.text_protos import message_class, read_text_proto

Arrays = dict[str, np.ndarray]


class _Batch:
    def __init__(self):
        self.members: list[tuple[Arrays, int]] = []  # (inputs, rows)
        self.rows = 0
        self.closed = threading.Event()  # full, or the leader stopped waiting
        self.done = threading.Event()
        self.outputs: Arrays | None = None
        self.error: BaseException | None = None


class Batcher:
    """Merges concurrent calls with the same key into one call (see the module docstring).

    Args:
      max_batch_size: most rows one merged call carries.
      timeout_s: how long the first request of a batch waits for others.
      split_large_batches: a request of more rows is split into pieces of that size.

    Example:
      batcher = Batcher(max_batch_size=32, timeout_s=0.002)
      outputs = batcher.run(key, lambda arrays: model(**arrays), {"x": x})  # x: [n, d]
    """

    def __init__(self, max_batch_size: int = 32, timeout_s: float = 0.002,
                 split_large_batches: bool = True):
        if max_batch_size < 1 or timeout_s < 0:
            raise ValueError(
                f"batching needs max_batch_size >= 1 and timeout >= 0, got {max_batch_size}, "
                f"{timeout_s}")
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.split_large_batches = split_large_batches
        self._lock = threading.Lock()
        self._open: dict[tuple, _Batch] = {}
        self._flushing = threading.Event()
        self.calls = 0  # merged calls made (for tests and benchmarks)

    def run(self, key: tuple, call: Callable[[Arrays], Arrays], inputs: Arrays) -> Arrays:
        """`call(inputs)`, possibly merged with concurrent calls of the same `key`.

        Args:
          key: requests with equal keys can be concatenated along dimension 0.
          call: the signature; takes and returns dicts of [batch, ...] arrays.
          inputs: this request's [n, ...] arrays (every array has n rows).
        """
        rows = len(next(iter(inputs.values()))) if inputs else 0
        if rows > self.max_batch_size and self.split_large_batches:
            pieces = [self.run(key, call, {name: value[start:start + self.max_batch_size]
                                           for name, value in inputs.items()})
                      for start in range(0, rows, self.max_batch_size)]
            return {name: np.concatenate([piece[name] for piece in pieces])
                    for name in pieces[0]}
        if rows == 0 or rows >= self.max_batch_size or self._flushing.is_set():
            return call(inputs)
        with self._lock:
            batch = self._open.get(key)
            if batch is not None and batch.rows + rows > self.max_batch_size:
                self._close(key, batch)
                batch = None
            leader = batch is None
            if leader:
                batch = self._open[key] = _Batch()
            start = batch.rows
            batch.members.append((inputs, rows))
            batch.rows += rows
            # _flushing is read again under the lock: a request that passed the check above
            # just before flush() would otherwise open a batch after flush() closed the open
            # ones, and hold the drain for a whole timeout
            if batch.rows >= self.max_batch_size or self._flushing.is_set():
                self._close(key, batch)
        if leader:
            self._lead(key, batch, call)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return {name: value[start:start + rows] for name, value in batch.outputs.items()}

    def _close(self, key: tuple, batch: _Batch) -> None:
        """Stops `batch` taking members (call with the lock held)."""
        if self._open.get(key) is batch:
            del self._open[key]
        batch.closed.set()

    def _lead(self, key: tuple, batch: _Batch, call: Callable[[Arrays], Arrays]) -> None:
        batch.closed.wait(self.timeout_s)
        with self._lock:
            self._close(key, batch)
        try:
            if len(batch.members) == 1:
                batch.outputs = call(batch.members[0][0])
            else:
                names = batch.members[0][0].keys()
                merged = {name: np.concatenate([m[name] for m, _ in batch.members])
                          for name in names}
                batch.outputs = call(merged)
            self.calls += 1
        except BaseException as error:  # noqa: BLE001  (every member gets the failure)
            batch.error = error
        finally:
            batch.done.set()

    def flush(self) -> None:
        """Ends every open batch's wait now; later calls run unbatched (used on shutdown)."""
        self._flushing.set()
        with self._lock:
            for key, batch in list(self._open.items()):
                self._close(key, batch)


# ---- --batching-parameters-file ------------------------------------------------------------

def _batching_parameters_class() -> type:
    """tensorflow.serving.BatchingParameters (servables/tensorflow/session_bundle_config.proto)."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="recsys_cvae/batching_parameters.proto", package="tensorflow.serving",
        syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
    message = proto.message_type.add(name="BatchingParameters")
    wrapped = {"max_batch_size": (1, "Int64Value"), "batch_timeout_micros": (2, "Int64Value"),
               "max_enqueued_batches": (3, "Int64Value"), "num_batch_threads": (4, "Int64Value"),
               "thread_pool_name": (5, "StringValue"),
               "enable_large_batch_splitting": (8, "BoolValue"),
               "max_execution_batch_size": (9, "Int64Value")}
    for name, (number, kind) in wrapped.items():
        message.field.add(name=name, number=number, type=11, label=1,
                          type_name=f".google.protobuf.{kind}")
    message.field.add(name="allowed_batch_sizes", number=6, type=3, label=3)
    message.field.add(name="pad_variable_length_inputs", number=7, type=8, label=1)
    return message_class(proto, "tensorflow.serving.BatchingParameters",
                         [wrappers_pb2.DESCRIPTOR])


def read_batching_parameters(path: str) -> dict:
    """{"max_batch_size", "timeout_s", "split_large_batches"} for `Batcher` from TF Serving's
    BatchingParameters text file. `max_execution_batch_size` (when set) is the size pieces and
    merged calls carry, as there; thread and queue settings have no counterpart here (requests
    run on the RPC threads) and are accepted as written.

    Raises:
      ValueError: the file is unreadable or not a BatchingParameters text proto.
    """
    parameters = read_text_proto(path, _batching_parameters_class(), "batching parameters")
    size = parameters.max_batch_size.value if parameters.HasField("max_batch_size") else 1000
    if parameters.HasField("max_execution_batch_size"):
        size = parameters.max_execution_batch_size.value
    timeout_us = (parameters.batch_timeout_micros.value
                  if parameters.HasField("batch_timeout_micros") else 0)
    split = (parameters.enable_large_batch_splitting.value  # unset: off, as the scheduler's
             if parameters.HasField("enable_large_batch_splitting") else False)
    return {"max_batch_size": int(size), "timeout_s": timeout_us / 1e6,
            "split_large_batches": bool(split)}
