"""The exported recommender's serving signatures as a Beam RunInference model handler.

Why the SavedModel and not the Keras model: the batch candidates job (`beam_jobs.candidates`)
must answer exactly what TF Serving answers, so it runs the export's `recommend` (warm users:
history + attributes) and `generate` (cold users: attributes alone) signatures, never
`recsys_cvae.model`.

Why an element is a whole batch of serialized users: the model costs a few hundred
microseconds of CPU per user, and every per-user Python object after it (a
`PredictionResult`, a row dict, Python lists turned back into Arrow columns) added tens of
microseconds. So the handler's element is a batch of serialized examples and its own batch
size is 1: one `PredictionResult` per batch, holding the batch's arrays. Its `tf.function`
parses the batch (`tf.io.parse_example`), runs the signature and hands its strings back in
Arrow's own layout (byte lengths + one joined buffer), so no Python object is built per item
id.

TensorFlow is imported inside the functions that use it, to defer a heavy dependency: it
takes seconds to load, and importing this module (the job's `--help`, the handler's class on
a worker) does not need it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S

RECOMMEND = "recommend"
GENERATE = "generate"
HISTORY_INPUT = "item_ids"  # the history input of `recommend`


class ExportError(ValueError):
    """The export directory holds no usable SavedModel for the requested signature."""


def parse_users(serialized, spec: S.FeatureSpec, with_history: bool) -> tuple[Any, dict[str, Any]]:
    """Serialized user examples -> (user ids, the signature's inputs), in one graph op.

    Why in TensorFlow: `tf.io.parse_example` decodes a whole batch in C++, where a Python
    protobuf decode plus padding costs tens of microseconds per user, paid for every user of
    every run. The parse spec is the feature spec's (`FeatureSpec.parse_spec`), so unknown
    values get the same defaults as training.

    The signature's attribute inputs are raw profile columns (`spec.serving_inputs`), while
    the records hold attributes, derived ones included (`zip_region`, not `zip_code`): each
    input is fed its stored attribute (`spec.inputs_from_attributes`), which the graph's
    derivation maps back to itself (derivations are projections).

    Args:
      serialized: [batch] tf.string, `tf.train.Example`s written by the feature job.
      spec: the feature spec (attributes in signature order).
      with_history: add the `item_ids` input (`recommend`); `generate` takes none.

    Returns:
      user_ids [batch] tf.string, and inputs: `item_ids` [batch, n] tf.string (histories
      right-padded with "", n = the longest history in the batch, at least 1) when
      `with_history`, plus per serving input (raw column) a [batch] tensor, tf.string for
      categorical ("" = unknown) or tf.float32 for numeric (NaN = unknown).
    """
    import tensorflow as tf  # deferred: see the module docstring

    stored = [i.stored_as for i in S.serving_inputs(spec) if i.stored_as is not None]
    wanted = [S.USER_ID, *([S.HISTORY] if with_history else []), *stored]
    parse_spec = spec.parse_spec()
    parsed = tf.io.parse_example(serialized, {name: parse_spec[name] for name in wanted})
    inputs = S.inputs_from_attributes(spec, parsed)
    if with_history:
        history = parsed[S.HISTORY].to_tensor(default_value="")  # [batch, longest]
        width = tf.maximum(tf.shape(history)[1], 1)
        inputs[HISTORY_INPUT] = tf.pad(history, [[0, 0], [0, width - tf.shape(history)[1]]])
    return parsed[S.USER_ID], inputs


def arrow_strings(lengths: np.ndarray, joined: bytes) -> pa.Array:
    """Strings stored back to back and their byte lengths -> an Arrow string array.

    Why: `.numpy()` of a string tensor builds one Python bytes object per string (K per
    user), which Arrow then copies into its own buffer again. Arrow's layout is exactly
    offsets + one buffer, so the graph joins the strings (`tf.strings.reduce_join`) and the
    joined bytes become the array's data as they are; `validate(full=True)` checks the
    offsets and the UTF-8.

    Args:
      lengths: [n] int, the byte length of each string.
      joined: the n strings concatenated, sum(lengths) bytes.
    """
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    strings = pa.StringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(joined))
    strings.validate(full=True)
    return strings


class SignatureRunner:
    """One signature of a loaded SavedModel fed serialized examples: parse, score, top-K.

    Why a wrapper: `ModelHandler.load_model` may hand the model to another process
    (`share_model_across_processes`), and a proxy can forward a method call with bytes
    arguments but not TensorFlow's `signatures[...]` lookup. It also keeps the loaded object
    alive, which the signature's variables need, and compiles parse + signature + the
    string joins of `arrow_strings` into one `tf.function`, so a batch costs one graph call,
    no numpy-to-tensor conversion and no Python object per output string.

    Args:
      export_dir: a SavedModel version directory (`export/<version>`).
      signature: `recommend` or `generate`.
      spec: the feature spec; its serving inputs (`spec.serving_inputs`: raw columns) must be
        the signature's inputs.
    """

    def __init__(self, export_dir: str, signature: str, spec: S.FeatureSpec) -> None:
        import tensorflow as tf  # deferred: see the module docstring

        self._loaded = tf.saved_model.load(export_dir)
        if signature not in self._loaded.signatures:
            available = sorted(self._loaded.signatures)
            raise ExportError(f"{export_dir}: no signature {signature!r}; it has {available}")
        function = self._loaded.signatures[signature]
        with_history = signature == RECOMMEND
        names = [HISTORY_INPUT] if with_history else []
        names += [i.name for i in S.serving_inputs(spec)]
        _, expected = function.structured_input_signature
        if set(expected) != set(names):
            raise ExportError(
                f"{export_dir}: signature {signature!r} takes inputs {sorted(expected)}, "
                f"but the feature spec gives {sorted(names)}; export and features differ"
            )

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def predict(serialized):
            user_ids, inputs = parse_users(serialized, spec, with_history)
            outputs = function(**inputs)
            item_ids = tf.reshape(outputs["item_ids"], [-1])  # [batch * K], row-major
            return {
                "user_id_lengths": tf.strings.length(user_ids),
                "user_ids_joined": tf.strings.reduce_join(user_ids),
                "item_id_lengths": tf.strings.length(item_ids),
                "item_ids_joined": tf.strings.reduce_join(item_ids),
                C.SCORES: outputs["scores"],
            }

        self._predict = predict

    def predict(self, serialized: Sequence[bytes]) -> dict[str, Any]:
        """serialized: [batch] example bytes. Returns `user_id` [batch] and `item_ids`
        [batch * K] (row-major, best first) as Arrow string arrays, and `scores` [batch, K]
        float32 numpy; "" ids and -inf scores pad the tail of a row whose history leaves
        fewer than K items."""
        import tensorflow as tf  # deferred: see the module docstring

        outputs = self._predict(tf.constant(serialized, tf.string))
        outputs = {name: value.numpy() for name, value in outputs.items()}
        return {
            C.USER_ID: arrow_strings(outputs["user_id_lengths"], outputs["user_ids_joined"]),
            C.ITEM_IDS: arrow_strings(outputs["item_id_lengths"], outputs["item_ids_joined"]),
            C.SCORES: outputs[C.SCORES],
        }


class SavedModelSignatureHandler(ModelHandler[Sequence[bytes], PredictionResult, SignatureRunner]):
    """RunInference handler for one signature of the exported recommender, a batch per element.

    Why an element is a whole batch of serialized users (made by `BatchUsers` upstream) and
    RunInference's own batch size is 1: a prediction is then one `PredictionResult` for the
    whole batch, holding its arrays, instead of one Python object per user. It is
    `PredictionResult(example=the serialized batch, inference={"user_id": [batch] strings,
    "item_ids": [batch * K] strings ("" = empty slot), "scores": [batch, K] float32})`, as
    `SignatureRunner.predict` returns it; `candidates_format.rows_of_top_k` makes rows of it.
    RunInference's own metrics therefore count batches; `num_users` (same namespace) counts
    users.

    Args:
      export_dir: the SavedModel version directory.
      signature: `recommend` (history + attributes) or `generate` (attributes only).
      spec: the feature spec (its serving inputs name the signature's inputs; parse spec).
      share_model_across_processes: load one copy per machine instead of one per process.
    """

    def __init__(
        self,
        export_dir: str,
        signature: str,
        spec: S.FeatureSpec,
        *,
        share_model_across_processes: bool = False,
    ) -> None:
        if signature not in (RECOMMEND, GENERATE):
            raise ValueError(f"signature must be {RECOMMEND!r} or {GENERATE!r}, got {signature!r}")
        super().__init__(
            min_batch_size=1, max_batch_size=1, large_model=share_model_across_processes
        )
        self._export_dir = export_dir
        self._signature = signature
        self._spec = spec

    def load_model(self) -> SignatureRunner:
        return SignatureRunner(self._export_dir, self._signature, self._spec)

    def run_inference(
        self,
        batch: Sequence[Sequence[bytes]],
        model: SignatureRunner,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        users = beam.metrics.Metrics.counter(self.get_metrics_namespace(), "num_users")
        model_id = f"{self._export_dir}:{self._signature}"
        for serialized in batch:  # one batch of users per element
            users.inc(len(serialized))
            yield PredictionResult(serialized, model.predict(serialized), model_id=model_id)

    def get_num_bytes(self, batch: Sequence[Sequence[bytes]]) -> int:
        """Serialized size, without Beam's default of pickling the whole batch again."""
        return sum(len(example) for users in batch for example in users)

    def get_metrics_namespace(self) -> str:
        return f"RunInference_{self._signature}"
