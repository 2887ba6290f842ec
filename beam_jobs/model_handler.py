"""A Beam RunInference model handler for recsys-cvae exports, for users' own pipelines.

Why not Beam's stock `TFModelHandlerTensor` / `TFModelHandlerNumpy`: they load a model
through Keras (and `tensorflow_hub`) and feed it one tensor, while an export's signatures take
several named inputs (`item_ids` [batch, n] plus one [batch] tensor per profile column) and
are loaded with `tf.saved_model.load`, as TF Serving loads them. This handler takes one dict
per user, named as the signature's inputs, and answers what TF Serving would:

    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference
    from beam_jobs.model_handler import ExportModelHandler

    users = [{"item_ids": ["50", "181"], "age": 30.0, "gender": "F",
              "occupation": "writer", "zip_code": "94110"}]
    with beam.Pipeline() as p:
        _ = (p | beam.Create(users)
               | RunInference(ExportModelHandler("runs/ml100k/export/1", "recommend"))
               | beam.Map(lambda result: result.inference["item_ids"][:10]))

Each `PredictionResult.inference` is {output name: numpy row} (`item_ids` as str, `scores`
float32 for `recommend`/`generate`; `z_mean`, `z_log_var` for `encode`). A missing input or
value means unknown ("" for a string, NaN for a number), as in the feature records; an input
the signature does not have is an error naming it. Histories of a batch are padded to the
longest with "". Batches follow RunInference's `min_batch_size` / `max_batch_size`.

TensorFlow is imported inside the methods that use it, to defer a heavy dependency until a
worker loads the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

HISTORY_INPUT = "item_ids"


class ExportModelHandler(ModelHandler[Mapping[str, Any], PredictionResult, Any]):
    """RunInference over one signature of an export version folder (module docstring).

    Args:
      export_dir: a version folder, e.g. `W/export/1` (a SavedModel with the `serve` tag).
      signature: `recommend` (default), `generate` or `encode`.
      min_batch_size, max_batch_size: users per signature call.
    """

    def __init__(self, export_dir: str, signature: str = "recommend",
                 min_batch_size: int = 1, max_batch_size: int = 256) -> None:
        super().__init__()
        self.export_dir, self.signature = export_dir, signature
        self._batch = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}

    def load_model(self) -> Any:
        # deferred: TensorFlow loads only on the worker that runs the model
        import tensorflow as tf

        loaded = tf.saved_model.load(self.export_dir, tags=["serve"])
        if self.signature not in loaded.signatures:
            raise ValueError(f"{self.export_dir}: no signature {self.signature!r}; it has "
                             f"{sorted(loaded.signatures)}")
        function = loaded.signatures[self.signature]
        function._loaded = loaded  # keeps the variables alive with the function
        return function

    def run_inference(self, batch: Sequence[Mapping[str, Any]], model: Any,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        import tensorflow as tf  # deferred with load_model

        specs = model.structured_input_signature[1]
        unknown = sorted({name for user in batch for name in user} - set(specs))
        if unknown:
            raise ValueError(f"inputs {unknown} are not inputs of {self.signature}; it takes "
                             f"{sorted(specs)}")
        inputs = {name: tf.constant(_column(name, [user.get(name) for user in batch], spec))
                  for name, spec in specs.items()}
        outputs = {name: value.numpy() for name, value in model(**inputs).items()}
        for row, user in enumerate(batch):
            yield PredictionResult(user, {name: _readable(value[row])
                                          for name, value in outputs.items()})

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return self._batch

    def get_metrics_namespace(self) -> str:
        return "recsys_cvae_export"


def _column(name: str, values: list, spec: Any) -> np.ndarray:
    """One input for the batch, of the signature's dtype; None means unknown."""
    if name == HISTORY_INPUT:
        width = max((len(v or []) for v in values), default=0)
        array = np.full((len(values), max(width, 1)), b"", dtype=object)
        for row, history in enumerate(values):
            array[row, :len(history or [])] = [str(item).encode() for item in history or []]
        return array
    if spec.dtype.is_floating:
        return np.array([math.nan if v is None or v == "" else float(v) for v in values],
                        dtype=spec.dtype.as_numpy_dtype)
    if spec.dtype.is_integer:  # `sample`'s num_items and seed
        return np.array([0 if v is None or v == "" else int(v) for v in values],
                        dtype=spec.dtype.as_numpy_dtype)
    return np.array([b"" if v is None else str(v).encode() for v in values], dtype=object)


def _readable(value: np.ndarray) -> np.ndarray:
    return value.astype(str) if value.dtype == object else value
