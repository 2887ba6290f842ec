"""The candidates job's Parquet output: Arrow tables sized as row groups, and their writer.

Why Arrow tables and `WriteToParquetBatched`: each model batch already arrives as Arrow
columns (`signature_inference`), and `candidates_format.rows_of_top_k` drops the "" padding with
vectorised Arrow calls, so no row becomes a Python object on its way to the file. The files
have the schema and names `WriteToParquet` would give them:

    candidates/<model>/<split>-SSSSS-of-NNNNN.parquet
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.transforms.window import GlobalWindows

from recsys_cvae import candidates_format as C

ROW_GROUP_BYTES = 64 * 1024 * 1024  # as WriteToParquet's row_group_buffer_size


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
        batch = C.rows_of_top_k(
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


def write_candidates(output_dir: str, model_name: str, split: str) -> beam.PTransform:
    """The Parquet sink of one split's candidate tables (`ToCandidateTables`' output).

    Why one function: the schema, file names and list layout are what
    `recsys_cvae.candidates_format` (`split_files`, `iter_rows`) and the evaluation read, so
    they are set in one place.
    """
    return beam.io.WriteToParquetBatched(
        C.split_prefix(output_dir, model_name, split),
        schema=C.SCHEMA,
        file_name_suffix=".parquet",
        shard_name_template="-SSSSS-of-NNNNN",
        use_compliant_nested_type=True,
    )
