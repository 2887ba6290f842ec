"""Batch candidates: users -> RunInference(SavedModel) -> Parquet, one folder per model.

Why Beam RunInference on the exported SavedModel (and not the Keras model): the batch job
must answer exactly what TF Serving answers, so it runs the same `recommend` / `generate`
signatures, never `recsys_cvae.model`. Warm users (validation, test, train) are served by
`recommend` from their history and attributes; cold users by `generate` from attributes
alone.

Why the element is a batch of users from `BatchUsers` on: the model costs a few hundred
microseconds of CPU per user, and every per-user Python object after it (a
`PredictionResult`, a row dict, Python lists turned back into Arrow columns, a shuffle
record) added tens of microseconds, most of what the job cost beyond the model. So users
are batched right after the read, and each later step handles one batch at a time:

    features/<split>/part-*.tfrecord.gz
      | ReadUsers[split] | BatchUsers (min..max users per batch) | Spread (of batches)
      | RunInference (one batch per element: parse, signature, top-K in one tf.function)
      | ToCandidateTables (Arrow columns; one table per bundle) | WriteCandidates[split]
      ->  candidates/<model>/<split>-SSSSS-of-NNNNN.parquet

- RunInference stays (its model sharing, metrics and runner support), with a handler whose
  element is a whole batch of serialized examples and whose own batch size is 1: one
  `PredictionResult` per batch, holding the batch's arrays.
- The `tf.function` parses the batch (`tf.io.parse_example`), runs the signature and hands
  its strings back in Arrow's own layout (byte lengths + one joined buffer), so no Python
  object is built per item id; `candidates_format.top_k_batch` drops the "" padding with
  vectorised Arrow calls and `WriteToParquetBatched` writes the tables, same schema and
  file names as `WriteToParquet`.
- `Spread` (a Reshuffle) hands batches to every worker: one gzip shard cannot be split, so
  without it the worker that reads a split would also score all of it. Shuffling batches
  instead of users makes it ~128 times fewer elements; on a single in-memory worker, where
  it spreads nothing, it then costs under 1% of the job (docs/scaling.md), too little to
  make the pipeline depend on the runner, so it runs everywhere.

Tuning (`CandidatesConfig`, docs/scaling.md "Batch candidates"): a fixed batch
(`min_batch_size` = `max_batch_size`, 128 users by default) is what the model is fastest
at. With min < max, BatchElements' adaptive search times only what follows it in the same
stage (the shuffle write, not the model), so batches grow to `max_batch_size`.
`share_model_across_processes` keeps one model per machine under multi_processing. Beam's
`max_batch_duration_secs` is left unset: it switches BatchElements to its stateful
(streaming) form, which keys every element alike and so serialises a batch job.

Examples:

    # local, DirectRunner with two worker processes sharing one model
    python -m beam_jobs.candidates --export-dir runs/demo/export \\
        --features-dir runs/demo/features --output-dir runs/demo/candidates \\
        --set candidates.share_model_across_processes=true \\
        --direct_num_workers=2 --direct_running_mode=multi_processing

    # Dataflow (export, features and output on GCS)
    python -m beam_jobs.candidates --export-dir gs://b/export --features-dir gs://b/features \\
        --output-dir gs://b/candidates --runner=DataflowRunner --project=P --region=R \\
        --temp_location=gs://b/tmp --requirements_file=requirements.txt
"""

from __future__ import annotations

import argparse
import logging
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.ml.inference.base import (
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.transforms.window import GlobalWindows

from beam_jobs.options import pipeline_options
from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S
from recsys_cvae.config import CandidatesConfig, load_config
from recsys_cvae.export_layout import newest_export

RECOMMEND = "recommend"
GENERATE = "generate"
HISTORY_INPUT = "item_ids"  # the history input of `recommend`
ROW_GROUP_BYTES = 64 * 1024 * 1024  # as WriteToParquet's row_group_buffer_size


class ExportError(ValueError):
    """The export directory holds no usable SavedModel for the requested signature."""


# ---- the model -----------------------------------------------------------------------------


def parse_users(serialized, spec: S.FeatureSpec, with_history: bool) -> tuple[Any, dict[str, Any]]:
    """Serialized user examples -> (user ids, the signature's inputs), in one graph op.

    Why in TensorFlow: `tf.io.parse_example` decodes a whole batch in C++, where a Python
    protobuf decode plus padding costs tens of microseconds per user, paid for every user of
    every run. The parse spec is the feature spec's (`FeatureSpec.parse_spec`), so unknown
    values get the same defaults as training.

    Args:
      serialized: [batch] tf.string, `tf.train.Example`s written by the feature job.
      spec: the feature spec (attributes in signature order).
      with_history: add the `item_ids` input (`recommend`); `generate` takes none.

    Returns:
      user_ids [batch] tf.string, and inputs: `item_ids` [batch, n] tf.string (histories
      right-padded with "", n = the longest history in the batch, at least 1) when
      `with_history`, plus per attribute a [batch] tensor, tf.string for categorical
      ("" = unknown) or tf.float32 for numeric (NaN = unknown).
    """
    import tensorflow as tf

    wanted = [S.USER_ID, *([S.HISTORY] if with_history else []), *spec.attribute_names]
    parse_spec = spec.parse_spec()
    parsed = tf.io.parse_example(serialized, {name: parse_spec[name] for name in wanted})
    inputs = {name: parsed[name] for name in spec.attribute_names}
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
      spec: the feature spec; its attributes must be the signature's inputs.
    """

    def __init__(self, export_dir: str, signature: str, spec: S.FeatureSpec) -> None:
        import tensorflow as tf

        self._loaded = tf.saved_model.load(export_dir)
        if signature not in self._loaded.signatures:
            available = sorted(self._loaded.signatures)
            raise ExportError(f"{export_dir}: no signature {signature!r}; it has {available}")
        function = self._loaded.signatures[signature]
        with_history = signature == RECOMMEND
        names = [HISTORY_INPUT] if with_history else []
        names += spec.attribute_names
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
        import tensorflow as tf

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
    `SignatureRunner.predict` returns it; `candidates_format.top_k_batch` makes rows of it.
    RunInference's own metrics therefore count batches; `num_users` (same namespace) counts
    users.

    Args:
      export_dir: the SavedModel version directory.
      signature: `recommend` (history + attributes) or `generate` (attributes only).
      spec: the feature spec (attributes in order, one signature input each; parse spec).
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


# ---- the pipeline --------------------------------------------------------------------------


class ToCandidateTables(beam.DoFn):
    """Per-batch predictions -> Arrow tables with the candidates schema, one per bundle.

    Why buffer: `WriteToParquetBatched` writes every table as its own row group, and a row
    group per model batch (128 rows) would make every reader pay per-group overhead. Like
    `WriteToParquet`'s own buffering, a table goes out at the end of a bundle, or earlier
    once `row_group_bytes` are buffered. The job's input is bounded, so the table left at
    the end of a bundle belongs to the global window.

    Args:
      model_label: the `model` column's value ("name/version").
      row_group_bytes: Arrow bytes buffered before a table is emitted mid-bundle.
    """

    def __init__(self, model_label: str, row_group_bytes: int = ROW_GROUP_BYTES) -> None:
        self._model_label = model_label
        self._row_group_bytes = row_group_bytes
        self._batches: list[pa.RecordBatch] = []
        self._bytes = 0

    def start_bundle(self) -> None:
        self._batches, self._bytes = [], 0

    def process(self, result: PredictionResult) -> Iterator[pa.Table]:
        inference = result.inference
        batch = C.top_k_batch(
            inference[C.USER_ID], inference[C.ITEM_IDS], inference[C.SCORES], self._model_label
        )
        self._batches.append(batch)
        self._bytes += batch.nbytes
        if self._bytes >= self._row_group_bytes:
            yield self._table()

    def finish_bundle(self) -> Iterator[Any]:
        if self._batches:
            yield GlobalWindows.windowed_value(self._table())

    def _table(self) -> pa.Table:
        table = pa.Table.from_batches(self._batches, schema=C.SCHEMA)
        self._batches, self._bytes = [], 0
        return table


class UsersToCandidates(beam.PTransform):
    """Serialized user examples -> Arrow tables of candidate rows (the candidates schema).

    Users are batched first, so everything after `BatchUsers` moves one batch per element
    (module docstring); `Spread` (a Reshuffle of those batches) lets every worker score: a
    gzip TFRecord shard cannot be split, so without it the worker that reads a split's only
    shard would also score all of it.

    Args:
      handler: the signature's RunInference handler (one batch per element).
      model_label: the `model` column's value.
      min_batch_size, max_batch_size: users per model call (BatchElements' bounds); equal
        bounds fix the batch size.
    """

    def __init__(
        self,
        handler: SavedModelSignatureHandler,
        model_label: str,
        *,
        min_batch_size: int = 128,
        max_batch_size: int = 128,
    ) -> None:
        super().__init__()
        if not 1 <= min_batch_size <= max_batch_size:
            raise ValueError(
                f"need 1 <= candidates.min_batch_size <= candidates.max_batch_size, got "
                f"{min_batch_size} and {max_batch_size}"
            )
        self._handler = handler
        self._model_label = model_label
        self._min_batch_size = min_batch_size
        self._max_batch_size = max_batch_size

    def expand(self, serialized_users):
        return (
            serialized_users
            | "BatchUsers"
            >> beam.BatchElements(
                min_batch_size=self._min_batch_size, max_batch_size=self._max_batch_size
            )
            | "Spread" >> beam.Reshuffle()
            | "RunInference" >> RunInference(self._handler)
            | "ToCandidateTables" >> beam.ParDo(ToCandidateTables(self._model_label))
        )


def resolve_export_dir(export_dir: str) -> tuple[str, str]:
    """(version directory, version): `export_dir` itself if it holds a SavedModel, else its
    newest integer-named subdirectory that does (TF Serving's layout)."""
    import tensorflow as tf

    version_dir = newest_export(export_dir)
    if version_dir is None:
        export_dir = export_dir.rstrip("/")
        if not tf.io.gfile.isdir(export_dir):
            raise ExportError(f"{export_dir}: export directory not found; run `recsys-cvae export`")
        raise ExportError(
            f"{export_dir}: no SavedModel and no integer version subdirectory holding one"
        )
    return version_dir, posixpath.basename(version_dir)


def generate_candidates(
    export_dir: str,
    features_dir: str,
    output_dir: str,
    config: CandidatesConfig,
    model_name: str = "cvae",
    pipeline_args: list[str] | None = None,
    *,
    save_main_session: bool = True,
    test_pipeline: beam.Pipeline | None = None,
) -> dict[str, int]:
    """Runs the candidates pipeline for config.splits; returns {split: users written}.

    `export_dir` is a version directory or a base directory (newest integer version).
    Rows carry `model` = "<model_name>/<version>". Old shards of those splits are deleted
    first, so the folder never mixes two runs.
    """
    import tensorflow as tf

    version_dir, version = resolve_export_dir(export_dir)
    spec = S.FeatureSpec.load(features_dir)
    patterns = {split: spec.split_pattern(split) for split in config.splits}
    for split, pattern in patterns.items():
        if not tf.io.gfile.glob(pattern):
            raise S.SpecError(f"{pattern}: no TFRecord files for split {split!r}")
    model_label = f"{model_name}/{version}"
    for split in config.splits:
        C.remove_split(output_dir, model_name, split)

    options = pipeline_options(pipeline_args, save_main_session)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    signature_of = {split: GENERATE if split == S.COLD else RECOMMEND for split in patterns}
    with pipeline as p:
        for split, pattern in patterns.items():
            handler = SavedModelSignatureHandler(
                version_dir,
                signature_of[split],
                spec,
                share_model_across_processes=config.share_model_across_processes,
            )
            candidates = UsersToCandidates(
                handler,
                model_label,
                min_batch_size=config.min_batch_size,
                max_batch_size=config.max_batch_size,
            )
            _ = (
                p
                | f"ReadUsers[{split}]"
                >> beam.io.ReadFromTFRecord(pattern, compression_type=CompressionTypes.GZIP)
                | f"Candidates[{split}]" >> candidates
                | f"WriteCandidates[{split}]"
                >> beam.io.WriteToParquetBatched(
                    C.split_prefix(output_dir, model_name, split),
                    schema=C.SCHEMA,
                    file_name_suffix=".parquet",
                    shard_name_template="-SSSSS-of-NNNNN",
                    use_compliant_nested_type=True,
                )
            )
    return {
        split: C.count_rows(C.split_files(output_dir, model_name, split)) for split in config.splits
    }


def run(argv=None, save_main_session=True, test_pipeline=None) -> dict[str, int]:
    """Parses this job's flags; everything else goes to PipelineOptions."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-dir", required=True, help="export/<version> or export base")
    parser.add_argument("--features-dir", required=True, help="the feature job's output")
    parser.add_argument("--output-dir", required=True, help="candidates directory")
    parser.add_argument("--model-name", default="cvae", help="folder and label of the model")
    parser.add_argument("--config", default=None, help="TOML config file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. candidates.max_batch_size=256",
    )
    known, pipeline_args = parser.parse_known_args(argv)
    config = load_config(known.config, known.set).candidates
    written = generate_candidates(
        known.export_dir,
        known.features_dir,
        known.output_dir,
        config,
        model_name=known.model_name,
        pipeline_args=pipeline_args,
        save_main_session=save_main_session,
        test_pipeline=test_pipeline,
    )
    logging.info("candidates written per split: %s", written)
    return written


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
