"""Synthetic users from an export's `sample` signature, as a Beam job (`recsys-cvae synthesize`).

Who the synthetic users are: each one copies the attribute values *and* the history length of
a training user drawn at random (so lengths follow the empirical distribution of the
matching segment, down to the full attribute combination), optionally restricted by
overrides (`age=25..34`, `device=ios`: only training users matching them are drawn) or
re-weighted by a population file (a CSV of attribute columns plus `weight`: combinations are
drawn by weight, lengths from the training users that match each one). Their items come from
`sample` (z ~ p(z|c), items without replacement from the CVAE's softmax) through
RunInference, seeded per user, so the same `--seed` gives byte-identical files on any runner.

Output, in the generic layout `recsys-cvae features` reads back:

    DIR/users.csv          user_id + one column per signature input (raw profile columns)
    DIR/interactions.csv   user_id,item_id (one row per sampled item, in sampled order)
                           [,timestamp with `timestamps`: each drawn from the source's
                           distribution of interaction times (101 quantiles the feature job
                           keeps), a user's sorted ascending in sampled order; the spread of
                           one user's activity in time is not modelled]

Shards of `USERS_PER_SHARD` users are sorted and written by the pipeline (`DIR/.parts/`), then
concatenated in shard order by the driver (a streaming copy, no shard held in memory twice).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import math
import os
import posixpath
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_jobs.model_handler import ExportModelHandler
from beam_jobs.options import pipeline_options
from recsys_cvae import protocols as P
from recsys_cvae import spec as S
from recsys_cvae import user_records as UR

USERS_PER_SHARD = 50_000
MAX_USERS = 100_000_000
PARTS = ".parts"


class SynthesisError(ValueError):
    """Settings that cannot be honoured: one line naming the flag or file."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """A training user's raw profile (signature input -> value) and history length."""

    inputs: Mapping[str, Any]
    length: int


def training_population(spec: S.FeatureSpec) -> list[Profile]:
    """Every user the served model trained on (`protocols.refit_splits`), as profiles."""
    profiles = []
    for split in P.refit_splits(spec) or list(spec.splits):
        for record in UR.read_user_records(spec, split):
            length = len(record[S.HISTORY]) + len(record.get(S.TARGETS, []))
            if length:
                profiles.append(Profile(S.inputs_from_attributes(spec, record), length))
    if not profiles:
        raise SynthesisError(f"{spec.directory}: no training users to draw profiles from")
    return profiles


def parse_override(text: str, numeric: Mapping[str, bool]) -> tuple[str, Any]:
    """`name=value` or, for a numeric input, `name=low..high` (inclusive)."""
    name, separator, value = text.partition("=")
    if not separator or name not in numeric:
        raise SynthesisError(f"--set {text!r}: expected INPUT=VALUE with INPUT one of "
                             f"{', '.join(numeric)}")
    if not numeric[name]:
        return name, value
    low, dots, high = value.partition("..")
    try:
        bounds = (float(low), float(high if dots else low))
    except ValueError:
        raise SynthesisError(f"--set {text!r}: {name} is numeric; expected a number or "
                             "LOW..HIGH") from None
    return name, bounds


def _matches(profile: Profile, overrides: Mapping[str, Any]) -> bool:
    for name, wanted in overrides.items():
        value = profile.inputs.get(name)
        if isinstance(wanted, tuple):
            number = float(value) if value not in (None, "") else math.nan
            if not wanted[0] <= number <= wanted[1]:
                return False
        elif str(value) != wanted:
            return False
    return True


def restrict(population: Sequence[Profile], overrides: Mapping[str, Any]) -> list[Profile]:
    kept = [p for p in population if _matches(p, overrides)]
    if not kept:
        wanted = ", ".join(f"{k}={v[0]:g}..{v[1]:g}" if isinstance(v, tuple) else f"{k}={v}"
                           for k, v in overrides.items())
        raise SynthesisError(f"--set {wanted}: no training user matches; nothing to copy "
                             "history lengths from")
    return kept


def weighted_population(path: str, population: Sequence[Profile], numeric: Mapping[str, bool]
                        ) -> list[tuple[Profile, float, list[int]]]:
    """--population: each row's attribute values with the lengths of matching training users
    (all of them when none matches), and its weight."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except OSError as error:
        raise SynthesisError(f"{path}: cannot read the population file ({error})") from None
    if not rows or "weight" not in header:
        raise SynthesisError(f"{path}: expected a header with attribute columns and `weight`")
    unknown = set(header) - set(numeric) - {"weight"}
    if unknown:
        raise SynthesisError(f"{path}: column(s) {sorted(unknown)} are not signature inputs "
                             f"({', '.join(numeric)})")
    weighted = []
    for line, row in enumerate(rows, start=2):
        if None in row or None in row.values():
            raise SynthesisError(f"{path}: line {line}: expected {len(header)} fields, like "
                                 "the header")
        try:
            weight = float(row["weight"])
        except ValueError:
            weight = math.nan
        if not (math.isfinite(weight) and weight >= 0):
            raise SynthesisError(f"{path}: line {line}: weight {row['weight']!r} is not a "
                                 "number ≥ 0")
        values = {k: v for k, v in row.items() if k != "weight" and v != ""}
        for name, value in values.items():
            if numeric[name]:
                try:
                    float(value)
                except ValueError:
                    raise SynthesisError(f"{path}: line {line}: {name} {value!r} is not a "
                                         "number") from None
        overrides = {k: (float(v), float(v)) if numeric[k] else v for k, v in values.items()}
        lengths = [p.length for p in population if _matches(p, overrides)] or [
            p.length for p in population]
        weighted.append((Profile(values, 0), weight, lengths))
    if not sum(w for _, w, _ in weighted) > 0:
        raise SynthesisError(f"{path}: every weight is 0; nothing to draw")
    return weighted


def user_seed(seed: int, index: int) -> int:
    """A 63-bit seed per synthetic user, independent of batching and shard."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _DrawUsers(beam.DoFn):
    """(start, stop) -> (index, sample inputs) for the synthetic users start .. stop − 1."""

    def __init__(self, population: Sequence[Profile], weighted: Sequence | None,
                 inputs: Sequence[str], seed: int) -> None:
        self.population, self.weighted = list(population), weighted
        self.inputs, self.seed = list(inputs), seed

    def process(self, bounds: tuple[int, int]) -> Iterator[tuple[int, dict]]:
        start, stop = bounds
        for index in range(start, stop):
            rng = np.random.default_rng([self.seed, index])
            if self.weighted:
                weights = np.array([w for _, w, _ in self.weighted], dtype=np.float64)
                chosen, _, lengths = self.weighted[rng.choice(len(weights),
                                                              p=weights / weights.sum())]
                values, length = dict(chosen.inputs), int(rng.choice(lengths))
            else:
                profile = self.population[rng.integers(len(self.population))]
                values, length = dict(profile.inputs), profile.length
            row = {name: values.get(name) for name in self.inputs}
            yield index, {**row, "num_items": length, "seed": user_seed(self.seed, index)}


class _WriteShard(beam.DoFn):
    """(shard, [(index, inputs, items)]) -> the shard's users and interactions part files."""

    def __init__(self, parts_dir: str, inputs: Sequence[str], seed: int,
                 time_quantiles: Sequence[float] | None) -> None:
        self.parts_dir, self.inputs, self.seed = parts_dir, list(inputs), seed
        self.time_quantiles = list(time_quantiles) if time_quantiles else None

    def _times(self, index: int, count: int) -> list[int]:
        """`count` timestamps from the source's time distribution (inverse CDF), sorted."""
        rng = np.random.default_rng([self.seed, index, 1])
        grid = np.linspace(0.0, 1.0, len(self.time_quantiles))
        return np.sort(np.interp(rng.random(count), grid, self.time_quantiles)).astype(
            np.int64).tolist()

    def process(self, element) -> Iterator[int]:
        shard, rows = element
        users, interactions = io.StringIO(), io.StringIO()
        user_writer, item_writer = csv.writer(users), csv.writer(interactions)
        count = 0
        for index, inputs, items in sorted(rows, key=lambda row: row[0]):
            user = f"synth{index:09d}"
            user_writer.writerow([user, *[_text(inputs.get(n)) for n in self.inputs]])
            items = [item for item in items if item]
            if self.time_quantiles is None:
                item_writer.writerows([user, item] for item in items)
            else:
                item_writer.writerows([user, item, time] for item, time in
                                      zip(items, self._times(index, len(items))))
            count += 1
        for name, text in (("users", users), ("interactions", interactions)):
            with FileSystems.create(posixpath.join(self.parts_dir,
                                                   f"{name}-{shard:05d}.csv")) as f:
                f.write(text.getvalue().encode("utf-8"))
        yield count


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


def synthesize(
    export_dir: str, features_dir: str, out_dir: str, num_users: int, *, seed: int = 0,
    overrides: Sequence[str] = (), population_file: str = "", timestamps: bool = False,
    pipeline_args: list[str] | None = None, save_main_session: bool = True,
    test_pipeline: beam.Pipeline | None = None, batch_size: int = 256,
) -> dict[str, Any]:
    """Writes `num_users` synthetic users to `out_dir` (module docstring); returns counts."""
    if not 0 < num_users <= MAX_USERS:
        raise SynthesisError(f"--users must be 1..{MAX_USERS:,}, got {num_users}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SynthesisError(f"--out {out_dir}: exists and is not a folder")
    spec = S.FeatureSpec.load(features_dir)
    time_quantiles = spec.counts.get("time_quantiles") if timestamps else None
    if timestamps and not time_quantiles:
        raise SynthesisError(f"--timestamps: {features_dir} records no interaction times (the "
                             "source has no timestamp column, or the features predate them)")
    numeric = {i.name: not i.is_categorical for i in S.serving_inputs(spec)}
    population = training_population(spec)
    restriction = dict(parse_override(text, numeric) for text in overrides)
    if restriction:
        population = restrict(population, restriction)
    weighted = weighted_population(population_file, population, numeric) if (
        population_file) else None
    parts_dir = posixpath.join(out_dir, PARTS)
    if FileSystems.exists(parts_dir):
        FileSystems.delete([parts_dir])
    shards = [(start, min(start + USERS_PER_SHARD, num_users))
              for start in range(0, num_users, USERS_PER_SHARD)]
    handler = KeyedModelHandler(ExportModelHandler(export_dir, "sample", 1, batch_size))
    options = pipeline_options(pipeline_args, save_main_session)
    with test_pipeline or beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | "Shards" >> beam.Create(shards)
            | "DrawUsers" >> beam.ParDo(_DrawUsers(population, weighted, list(numeric), seed))
            | "Sample" >> RunInference(handler)
            # .tolist(): Python strings, which Beam's coder writes natively; numpy strings
            # would be pickled one by one (most of the job's time in a profile)
            | "ByShard" >> beam.Map(lambda kv: (kv[0] // USERS_PER_SHARD, (
                kv[0], kv[1].example, kv[1].inference["item_ids"].tolist())))
            | "GroupShards" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(_WriteShard(parts_dir, list(numeric), seed,
                                                      time_quantiles))
        )
    os.makedirs(out_dir, exist_ok=True)
    counts = {}
    interaction_columns = ["user_id", "item_id"] + (["timestamp"] if timestamps else [])
    for name, header in (("users", ["user_id", *numeric]), ("interactions",
                                                            interaction_columns)):
        target = os.path.join(out_dir, f"{name}.csv")
        with open(target, "w", newline="") as out:
            csv.writer(out).writerow(header)
            for shard in range(len(shards)):
                with FileSystems.open(posixpath.join(parts_dir, f"{name}-{shard:05d}.csv"),
                                      compression_type="uncompressed") as part:
                    shutil.copyfileobj(io.TextIOWrapper(part, encoding="utf-8", newline=""),
                                       out)
        with open(target) as f:
            counts[name] = sum(1 for _ in f) - 1
    FileSystems.delete([parts_dir])
    return {"users": counts["users"], "interactions": counts["interactions"],
            "out_dir": out_dir, "seed": seed}
