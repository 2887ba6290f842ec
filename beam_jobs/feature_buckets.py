"""Per-bucket work of the feature job: dedupe and join, user records per protocol, shards.

Why a module of its own: these are the steps that touch every row, so they run on whole
buckets with numpy/pandas (one element per bucket, not per row) and write TFRecords
directly; `features.py` wires them into the pipeline.
"""

from __future__ import annotations

import math
import pickle
import posixpath
import zlib

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.pvalue import AsSingleton, TaggedOutput

from beam_jobs import bucket_records as B
from beam_jobs import feature_stats as F
from beam_jobs import splits as P
from beam_jobs.example_encoding import ExampleEncoder
from beam_jobs.feature_reading import COUNTS, DEAD, INTERACTION_SCHEMA, dead_letter
from recsys_cvae import spec as S
from recsys_cvae.config import FeaturesConfig

USERS_PER_SHARD = 50_000
GZIP_LEVEL = 1  # 2x faster than the default 6, files ~20% larger


def prepare_bucket(tables: list[pa.Table], profiles: list, min_rating: float | None):
    """A bucket's interaction tables and profile rows -> (BucketEvents, duplicate-user letters).

    Dedupes (user, item) events (the latest wins, see the module docstring) and profiles (the
    first row wins), and marks positives (rating >= min_rating).
    """
    table = pa.concat_tables(tables) if tables else INTERACTION_SCHEMA.empty_table()
    frame = table.to_pandas()
    frame["t"] = frame["timestamp"].fillna(-np.inf)
    frame["r"] = frame["rating"].fillna(-np.inf)
    frame = frame.sort_values(["user", "item", "t", "r"], kind="stable")
    events = frame.groupby(["user", "item"], sort=False).size().to_numpy()
    frame = frame.drop_duplicates(["user", "item"], keep="last").assign(events=events)

    kept, letters = {}, []
    for source, line, raw, row in sorted(profiles, key=lambda p: (p[0], p[1])):
        if row.user_id in kept:
            detail = f"user_id {row.user_id!r} already defined on line {kept[row.user_id][0]}"
            letters.append(dead_letter(source, line, "duplicate_user_id", detail, raw))
        else:
            kept[row.user_id] = (line, row.attributes)
    users = np.array(sorted(set(frame["user"]) | set(kept)), dtype=object)
    frame["code"] = np.searchsorted(users, frame["user"].to_numpy(dtype=object))
    frame = frame.sort_values(["code", "t", "item"], kind="stable")
    item_code, items = pd.factorize(frame["item"].to_numpy(dtype=object), sort=True)
    rating = frame["rating"].to_numpy()
    positive = np.ones(len(frame), bool) if min_rating is None else rating >= min_rating
    bucket = P.BucketEvents(
        users=users,
        items=np.asarray(items, dtype=object),
        user=frame["code"].to_numpy(np.int32),
        item_code=item_code.astype(np.int32),
        rating=rating,
        timestamp=frame["timestamp"].to_numpy(),
        events=frame["events"].to_numpy(np.int32),
        positive=positive,
        profiles={user: attributes for user, (_, attributes) in kept.items()},
    )
    return bucket, letters


class PrepareBucketFn(beam.DoFn):
    def __init__(self, min_rating: float | None, users_path: str) -> None:
        self.min_rating, self.users_path = min_rating, users_path
        self.duplicates = Metrics.counter("features", "bad_rows_duplicate_user_id")
        self.merged = Metrics.counter("features", "duplicate_interactions")

    def process(self, element):
        number, grouped = element
        bucket, letters = prepare_bucket(
            list(grouped["interactions"]),
            [row for rows in grouped["users"] for row in rows],
            self.min_rating,
        )
        self.merged.inc(int(bucket.events.sum() - len(bucket.events)))
        for letter in letters:
            self.duplicates.inc()
            yield TaggedOutput(DEAD, letter)
        if letters:
            yield TaggedOutput(COUNTS, (self.users_path, (0, -len(letters), len(letters))))
        yield number, bucket


class ExamplesFn(beam.DoFn):
    """(bucket, BucketEvents) -> (split, bucket, pack_records([(user_id, Example bytes)])),
    plus (bucket, users per split, numeric sums of the primary training split, distinct users)
    as "stats": the spec's numeric statistics are over training users only."""

    def __init__(self, config: FeaturesConfig, protocols: list[str], context: list[str]) -> None:
        self.config, self.protocols, self.context = config, protocols, context

    def setup(self) -> None:
        self.encoders: dict[tuple, ExampleEncoder] = {}

    def process(self, element, vocabulary, kinds, latest, cut):
        number, bucket = element
        kinds = dict(kinds, **{name: S.NUMERIC for name in self.context})
        key = tuple(kinds.items())
        if key not in self.encoders:  # one per kinds: its string cache spans buckets
            self.encoders[key] = ExampleEncoder(
                S.AttributeSpec(name, kind, vocabulary_file="-") for name, kind in key
            )
        encoder = self.encoders[key]
        time = {"now": latest} if cut is None else {"now": latest, "cut": cut}
        by_split: dict[str, list] = {}
        for example in B.bucket_examples(
            bucket, vocabulary, self.config, self.protocols, time, self.context
        ):
            serialized = encoder.encode(
                example.user_id, example.history, example.targets, example.attributes,
                example.history_weights,
            )
            by_split.setdefault(example.split, []).append((example.user_id, serialized, example))
        for split, records in sorted(by_split.items()):
            yield split, number, pack_records([(user_id, data) for user_id, data, _ in records])
        train_split = P.PROTOCOL_SPLITS[P.primary_protocol(self.protocols)].get("train")
        train = [example for _, _, example in by_split.get(train_split, [])]
        users = {user_id for records in by_split.values() for user_id, _, _ in records}
        yield TaggedOutput("stats", (
            number,
            {split: len(records) for split, records in by_split.items()},
            F.numeric_sums(train, kinds),
            len(users),
        ))  # fmt: skip


def pack_records(records: list[tuple[str, bytes]]) -> bytes:
    """A batch of (user_id, serialized Example) as zlib-1 bytes: a quarter of the size to
    shuffle and hold between the examples and the shard writers, for a few seconds of CPU."""
    return zlib.compress(pickle.dumps(records, protocol=5), 1)


def unpack_records(packed: bytes) -> list[tuple[str, bytes]]:
    return pickle.loads(zlib.decompress(packed))


def shard_count(split: str, num_users: int, config: FeaturesConfig) -> int:
    """Shards for a split: the configured count for train, else one per ~50k users; never
    more than the buckets (a shard holds whole buckets)."""
    wanted = config.num_shards if split == S.TRAIN and config.num_shards else math.ceil(
        num_users / USERS_PER_SHARD
    )
    return max(1, min(wanted, config.num_buckets))


class _WriteShardFn(beam.DoFn):
    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir

    def process(self, element, users_per_split, config):
        import tensorflow as tf  # deferred: heavy, and only the shard writer needs it

        (split, shard), batches = element
        records = sorted(record for batch in batches for record in unpack_records(batch))
        num_shards = shard_count(split, users_per_split.get(split, 0), config)
        directory = posixpath.join(self.output_dir, split)
        tf.io.gfile.makedirs(directory)
        path = posixpath.join(directory, f"part-{shard:05d}-of-{num_shards:05d}.tfrecord.gz")
        options = tf.io.TFRecordOptions(compression_type="GZIP", compression_level=GZIP_LEVEL)
        with tf.io.TFRecordWriter(path, options=options) as writer:
            for _, serialized in records:
                writer.write(serialized)
        yield path, len(records)


class WriteSplits(beam.PTransform):
    """(split, bucket, packed records) -> `<split>/part-SSSSS-of-NNNNN.tfrecord.gz` (GZIP).

    A shard holds whole buckets (bucket mod N), sorted by user id, so files are byte-identical
    across runs (Beam's own sinks shard at random). Every shard is written, even empty, so a
    split's file pattern always matches.
    """

    def __init__(self, output_dir: str, splits: list[str], config: FeaturesConfig) -> None:
        super().__init__()
        self.output_dir, self.splits, self.config = output_dir, splits, config

    def expand(self, inputs):
        batches, users_per_split = inputs["batches"], inputs["users_per_split"]
        config, splits = self.config, self.splits
        keyed = batches | "KeyByShard" >> beam.Map(
            lambda b, counts: ((b[0], b[1] % shard_count(b[0], counts.get(b[0], 0), config)),
                               b[2]),
            AsSingleton(users_per_split),
        )  # fmt: skip
        every_shard = users_per_split | "EveryShard" >> beam.FlatMap(
            lambda counts: [
                ((split, i), pack_records([]))
                for split in splits
                for i in range(shard_count(split, counts.get(split, 0), config))
            ]
        )
        return (
            (keyed, every_shard)
            | "AllShards" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShards"
            >> beam.ParDo(_WriteShardFn(self.output_dir), AsSingleton(users_per_split), config)
        )



def sum_by_split(stats) -> dict[str, int]:
    total: dict[str, int] = {}
    for _, per_split, _, _ in stats:
        for split, n in per_split.items():
            total[split] = total.get(split, 0) + n
    return dict(sorted(total.items()))
