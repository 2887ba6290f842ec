"""Batch candidates: users -> RunInference(SavedModel) -> Parquet, one folder per model.

Why Beam RunInference on the exported SavedModel (and not the Keras model): the batch job
must answer exactly what TF Serving answers, so it runs the same `recommend` / `generate`
signatures, never `recsys_cvae.model`. Warm users (validation, test, train) are served by
`recommend` from their history and attributes; cold users by `generate` from attributes
alone. The signatures take raw profile columns (`zip_code`) while the feature records hold
the attributes (`zip_region`, derived from it): `signature_inference.parse_users` feeds each
input its stored attribute through `spec.serving_inputs`, which the graph's derivation maps
back to itself (every derivation is a projection), so the candidates are what a client
sending the raw profile gets.

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
  `PredictionResult` per batch, holding the batch's arrays (`signature_inference`).
- The `tf.function` parses the batch (`tf.io.parse_example`), runs the signature and hands
  its strings back in Arrow's own layout (byte lengths + one joined buffer), so no Python
  object is built per item id; `candidates_format.rows_of_top_k` drops the "" padding with
  vectorised Arrow calls and `WriteToParquetBatched` writes the tables, same schema and
  file names as `WriteToParquet` (`candidate_parquet`).
- `Spread` (a Reshuffle) hands batches to every worker: one gzip shard cannot be split, so
  without it the worker that reads a split would also score all of it. Shuffling batches
  instead of users makes it ~128 times fewer elements; on a single in-memory worker, where
  it spreads nothing, it then costs under 1% of the job (docs/scaling.md), too little to
  make the pipeline depend on the runner, so it runs everywhere.

This module is the job driver (which export, which splits, the pipeline, the CLI); the model
handler is in `beam_jobs.signature_inference`, the Parquet output in
`beam_jobs.candidate_parquet`.

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

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.ml.inference.base import RunInference

from beam_jobs.candidate_parquet import ToCandidateTables, write_candidates
from beam_jobs.options import pipeline_options
from beam_jobs.signature_inference import (
    GENERATE,
    RECOMMEND,
    ExportError,
    SavedModelSignatureHandler,
)
from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S
from recsys_cvae.config import CandidatesConfig, load_config
from recsys_cvae.export_layout import newest_export


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
    import tensorflow as tf  # deferred: a heavy dependency `--help` does not need

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
    import tensorflow as tf  # deferred: a heavy dependency `--help` does not need

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
                | f"WriteCandidates[{split}]" >> write_candidates(output_dir, model_name, split)
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
