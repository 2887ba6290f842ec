"""The candidates format: the one file layout every recommender writes and evaluation reads.

Why a module of its own: the Beam RunInference job, the in-process baselines and the
evaluation must agree byte for byte on the Parquet schema and on where the files go, and
none of them should import another's internals to learn it.

    W/candidates/<model_name>/<split>-SSSSS-of-NNNNN.parquet

    user_id   string          the raw user id
    item_ids  list<string>    recommended items, best first (at most K)
    scores    list<float32>   the model's score for each item, same length as item_ids
    model     string          "name/version" (e.g. "cvae/3") or just "name" for baselines
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

USER_ID = "user_id"
ITEM_IDS = "item_ids"
SCORES = "scores"
MODEL = "model"

SCHEMA = pa.schema(
    [
        pa.field(USER_ID, pa.string()),
        pa.field(ITEM_IDS, pa.list_(pa.string())),
        pa.field(SCORES, pa.list_(pa.float32())),
        pa.field(MODEL, pa.string()),
    ]
)


class CandidatesError(ValueError):
    """A candidates folder or file does not follow the format above."""


def split_prefix(candidates_dir: str, model_name: str, split: str) -> str:
    """`candidates_dir/<model_name>/<split>`: shards append `-SSSSS-of-NNNNN.parquet`."""
    return posixpath.join(candidates_dir, model_name, split)


def split_files(candidates_dir: str, model_name: str, split: str) -> list[str]:
    """The shard files of one model and split, sorted; empty when there are none."""
    import tensorflow as tf

    pattern = split_prefix(candidates_dir, model_name, split) + "-*-of-*.parquet"
    return sorted(tf.io.gfile.glob(pattern))


def remove_split(candidates_dir: str, model_name: str, split: str) -> None:
    """Deletes old shards first, so a rerun with fewer shards leaves no stale file behind."""
    import tensorflow as tf

    for path in split_files(candidates_dir, model_name, split):
        tf.io.gfile.remove(path)


def model_names(candidates_dir: str) -> list[str]:
    """Every model folder under candidates_dir that holds at least one Parquet file."""
    import tensorflow as tf

    if not tf.io.gfile.isdir(candidates_dir):
        raise CandidatesError(f"{candidates_dir}: no candidates directory")
    names = []
    for entry in sorted(tf.io.gfile.listdir(candidates_dir)):
        name = entry.rstrip("/")
        folder = posixpath.join(candidates_dir, name)
        if tf.io.gfile.isdir(folder) and tf.io.gfile.glob(posixpath.join(folder, "*.parquet")):
            names.append(name)
    return names


def to_table(
    user_ids: Sequence[str],
    item_ids: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    model: str,
) -> pa.Table:
    """Columns to a table with exactly SCHEMA (scores cast to float32)."""
    if not (len(user_ids) == len(item_ids) == len(scores)):
        raise CandidatesError(
            f"column lengths differ: {len(user_ids)} users, {len(item_ids)} item lists, "
            f"{len(scores)} score lists"
        )
    return pa.table(
        {
            USER_ID: pa.array(list(user_ids), pa.string()),
            ITEM_IDS: pa.array([list(row) for row in item_ids], pa.list_(pa.string())),
            SCORES: pa.array(
                [np.asarray(row, dtype=np.float32) for row in scores], pa.list_(pa.float32())
            ),
            MODEL: pa.array([model] * len(user_ids), pa.string()),
        },
        schema=SCHEMA,
    )


def rows_of_top_k(
    user_ids: pa.Array, item_ids: pa.Array, scores: np.ndarray, model: str
) -> pa.RecordBatch:
    """A model's padded top-K answer for a batch of users -> rows with exactly SCHEMA.

    Why: the top-K signatures answer `[batch, K]` tensors and pad a row whose history leaves
    fewer than K items with "" ids (and -inf scores). Building the columns from the flat
    arrays (list offsets from the per-row counts of real items, padding dropped by one Arrow
    filter) costs a few vectorised passes per batch, where a Python list per user costs
    tens of microseconds per user.

    Args:
      user_ids: [batch] strings.
      item_ids: [batch * K] strings, row-major (user r's slots are `r*K .. r*K + K-1`), best
        first; "" marks an empty slot.
      scores: [batch, K] float32, the score of each slot.
      model: the value of the `model` column.

    Returns:
      `batch` rows; row r holds user r's non-empty slots, in order, and their scores.
    """
    batch = len(user_ids)
    if scores.ndim != 2 or scores.shape[0] != batch or len(item_ids) != scores.size:
        raise CandidatesError(
            f"top-K shapes differ: {batch} users, {len(item_ids)} item ids, scores "
            f"{scores.shape}; expected [batch], [batch * K] and [batch, K]"
        )
    filled = pc.greater(pc.binary_length(item_ids), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(batch + 1, np.int32)
    np.cumsum(filled.reshape(scores.shape).sum(axis=1), out=offsets[1:])
    offsets = pa.array(offsets)
    return pa.RecordBatch.from_arrays(
        [
            user_ids.cast(pa.string()),
            pa.ListArray.from_arrays(offsets, item_ids.filter(pa.array(filled)).cast(pa.string())),
            pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1)[filled], pa.float32())),
            pa.array([model] * batch, pa.string()),
        ],
        schema=SCHEMA,
    )


def write_split(candidates_dir: str, model_name: str, split: str, table: pa.Table) -> str:
    """Writes one split as a single shard (`<split>-00000-of-00001.parquet`); returns its path.

    Remote paths go through tf.io.gfile, so `gs://` and other TensorFlow file systems work.
    """
    import tensorflow as tf

    if table.schema != SCHEMA:
        raise CandidatesError(f"table schema {table.schema} is not the candidates schema {SCHEMA}")
    remove_split(candidates_dir, model_name, split)
    path = split_prefix(candidates_dir, model_name, split) + "-00000-of-00001.parquet"
    tf.io.gfile.makedirs(posixpath.dirname(path))
    if "://" not in path:
        pq.write_table(table, path)
        return path
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue().to_pybytes())
    return path


def open_parquet(path: str) -> pq.ParquetFile:
    """A local file is streamed; a remote one (gs://...) is read into memory through
    tf.io.gfile, whose file objects pyarrow cannot use directly."""
    import tensorflow as tf

    if "://" not in path:
        return pq.ParquetFile(path)
    with tf.io.gfile.GFile(path, "rb") as f:
        return pq.ParquetFile(pa.BufferReader(f.read()))


def iter_rows(
    paths: Iterable[str], batch_size: int = 4096
) -> Iterator[tuple[str, list[str], list[float], str]]:
    """Streams (user_id, item_ids, scores, model) from shards without loading whole files."""
    for path in paths:
        parquet = open_parquet(path)
        missing = set(SCHEMA.names) - set(parquet.schema_arrow.names)
        if missing:
            raise CandidatesError(
                f"{path}: missing column(s) {sorted(missing)}; expected {SCHEMA.names}"
            )
        for batch in parquet.iter_batches(batch_size=batch_size, columns=SCHEMA.names):
            data = batch.to_pydict()
            yield from zip(
                data[USER_ID],
                ([] if items is None else items for items in data[ITEM_IDS]),
                ([] if scores is None else scores for scores in data[SCORES]),
                data[MODEL],
            )


def count_rows(paths: Iterable[str]) -> int:
    """Rows in the given shards, from the Parquet footers only."""
    return sum(open_parquet(path).metadata.num_rows for path in paths)


# ---- which model answered which split ------------------------------------------------------

SOURCES_FILE = "sources.json"


def read_sources(candidates_dir: str, model_name: str = "cvae") -> dict[str, dict[str, str]]:
    """split -> {"protocol", "model_dir", "export_dir"} of a model's candidates; {} if none.

    Written next to the shards (`<model_name>/sources.json`) by the run that wrote them, so
    the evaluation can say which protocol's model answered each split.
    """
    import tensorflow as tf  # deferred: tf.io.gfile only, and this module loads without TF

    path = posixpath.join(candidates_dir, model_name, SOURCES_FILE)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def write_sources(
    candidates_dir: str, sources: dict[str, dict[str, str]], model_name: str = "cvae"
) -> None:
    """Replaces `<model_name>/sources.json` with `sources` (split -> where it came from)."""
    import tensorflow as tf  # deferred, as in read_sources

    tf.io.gfile.makedirs(posixpath.join(candidates_dir, model_name))
    with tf.io.gfile.GFile(posixpath.join(candidates_dir, model_name, SOURCES_FILE), "w") as f:
        f.write(json.dumps(sources, indent=2) + "\n")
