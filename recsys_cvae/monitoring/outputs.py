"""What a model recommended, read from candidates or from serving request logs.

Why one reader for both: teams monitor the same quantities on the batch candidates they ship
and on the live traffic the server logged; both become the same `Recommendations` (each
user's ranked items and scores, and their attributes when known), so every metric in
`monitoring.drift` is written once.

Sources (`read_recommendations`):
  - a candidates folder (`recsys_cvae.candidates_format`: `*.parquet` at any depth, e.g.
    `W/candidates/cvae`); attributes from `users_file` (a users CSV) when given;
  - a request-log folder or file prefix: TFRecord `PredictionLog`s as the server writes them
    (`logging_config`, `serving.request_log`) or as the warmup file holds them; the answers'
    `item_ids`/`scores`, the requests' `[batch]` inputs as attributes.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
from collections.abc import Iterable, Mapping

import numpy as np

from recsys_cvae import candidates_format as C

RANKING_SIGNATURE_INPUTS = ("item_ids", "exclude_item_ids")  # not attributes
MAX_USERS = 5_000_000  # a source with more rows is refused, not read into memory


class MonitorInputError(ValueError):
    """A source that is neither candidates nor request logs, or that cannot be read."""


@dataclasses.dataclass
class Recommendations:
    """Ranked items per user (best first), their scores, and attribute values per user."""

    source: str
    kind: str  # "candidates" or "request log"
    items: list[list[str]]
    scores: list[list[float]]
    attributes: dict[str, list[str]]  # attribute -> one value per user ("" unknown)

    @property
    def users(self) -> int:
        return len(self.items)


def read_recommendations(source: str, users_file: str = "") -> Recommendations:
    """Candidates (Parquet) or request logs (TFRecord) at `source`; see the module docstring."""
    parquet = sorted(glob.glob(os.path.join(source, "**", "*.parquet"), recursive=True))
    if os.path.isdir(source) and parquet:
        return _from_candidates(source, parquet, users_file)
    records = sorted(glob.glob(os.path.join(source, "*.tfrecord")) if os.path.isdir(source)
                     else glob.glob(source + "*"))
    if records:
        return _from_request_logs(source, records)
    raise MonitorInputError(
        f"{source}: no candidates (*.parquet) or request logs (*.tfrecord PredictionLogs) "
        "found; give a candidates folder such as W/candidates/cvae or a log folder/prefix")


def _from_candidates(source: str, paths: list[str], users_file: str) -> Recommendations:
    users, items, scores = [], [], []
    try:
        for user, ids, values, _ in C.iter_rows(paths):
            users.append(user)
            items.append(ids)
            scores.append(values)
            if len(users) > MAX_USERS:
                raise MonitorInputError(f"{source}: more than {MAX_USERS:,} rows")
    except C.CandidatesError as error:
        raise MonitorInputError(str(error)) from None
    attributes: dict[str, list[str]] = {}
    if users_file:
        profiles = _read_users(users_file)
        if users and not any(u in profiles for u in users[:1000]):
            raise MonitorInputError(f"--users {users_file}: none of {source}'s users are in it "
                                    "(expected a users CSV whose first column is the user id)")
        columns = sorted({c for p in profiles.values() for c in p})
        attributes = {c: [profiles.get(u, {}).get(c, "") for u in users] for c in columns}
    return Recommendations(source, "candidates", items, scores, attributes)


def _read_users(path: str) -> dict[str, dict[str, str]]:
    """users.csv -> user id -> {column: value} (the first column is the user id)."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            return {row[0]: dict(zip(header[1:], row[1:])) for row in reader if row}
    except (OSError, StopIteration, UnicodeDecodeError) as error:
        raise MonitorInputError(f"{path}: cannot read the users file ({error})") from None


def _from_request_logs(source: str, paths: list[str]) -> Recommendations:
    import tensorflow as tf  # deferred: candidates need no TensorFlow
    from tensorflow_serving.apis import prediction_log_pb2

    items: list[list[str]] = []
    scores: list[list[float]] = []
    attributes: dict[str, list[str]] = {}
    for path in paths:
        try:
            for number, record in enumerate(tf.data.TFRecordDataset(path)):
                entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
                _add_answers(entry, items, scores, attributes)
                if len(items) > MAX_USERS:
                    raise MonitorInputError(f"{source}: more than {MAX_USERS:,} rows")
        except tf.errors.DataLossError as error:
            raise MonitorInputError(f"{path}: record {number + 1}: not a TFRecord "
                                    f"({str(error).splitlines()[0]})") from None
        except Exception as error:  # noqa: BLE001  (a corrupt proto: name the file)
            if isinstance(error, MonitorInputError):
                raise
            raise MonitorInputError(f"{path}: not PredictionLog records ({error})") from None
    return Recommendations(source, "request log", items, scores, attributes)


def _add_answers(entry, items: list, scores: list, attributes: dict) -> None:
    """One logged Predict call's rows (requests without ranked answers are skipped)."""
    import tensorflow as tf

    log = entry.predict_log
    outputs = log.response.outputs
    if "item_ids" not in outputs or "scores" not in outputs:
        return
    ids = tf.make_ndarray(outputs["item_ids"]).astype(str)
    values = tf.make_ndarray(outputs["scores"])
    before = len(items)
    for row_ids, row_scores in zip(ids, values):
        keep = row_ids != ""
        items.append(list(row_ids[keep]))
        scores.append([float(s) for s in row_scores[keep]])
    inputs = {name: tf.make_ndarray(proto) for name, proto in log.request.inputs.items()
              if name not in RANKING_SIGNATURE_INPUTS}
    for name in set(attributes) | set(inputs):
        column = attributes.setdefault(name, [""] * before)
        values_in = inputs.get(name)
        if values_in is None or values_in.ndim != 1 or len(values_in) != len(ids):
            column.extend([""] * len(ids))
        else:
            column.extend(_text(v) for v in values_in)


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return ""
    return str(value)


def exposure(recommendations: Recommendations,
             rows: Iterable[int] | None = None) -> Mapping[str, int]:
    """item -> times recommended (every position of every list), to all users or to `rows`."""
    lists = recommendations.items if rows is None else (recommendations.items[r] for r in rows)
    counts: dict[str, int] = {}
    for row in lists:
        for item in row:
            counts[item] = counts.get(item, 0) + 1
    return counts
