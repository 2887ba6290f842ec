"""Offline evaluation with Beam, for candidates beyond one machine.

Why it exists next to `recsys_cvae.evaluation.evaluate`: the in-process evaluation streams
Parquet row groups on one machine; this job spreads the same work over workers. It shares
everything that computes a number: each worker turns Parquet row groups into partial
`scoring.ModelScore`s with `scoring.score_batch` (the same function the in-process path calls),
a CombineFn merges them, and `scoring.finish` + `scoring.summarise` produce the same JSON. The
bootstrap weights are a hash of the user id, so the intervals do not depend on how the data is
split over workers.

    candidates/<model>/<split>-*.parquet
      | ReadRowGroups | ScoreRowGroups | MergeScores | Summarise | WriteSummary -> JSON

Examples:

    # local, DirectRunner
    python -m beam_jobs.evaluate --features-dir runs/demo/features \\
        --candidates-dir runs/demo/candidates --model cvae --split test \\
        --output runs/demo/report/beam_cvae_test.json

    # Dataflow
    python -m beam_jobs.evaluate --features-dir gs://b/features --candidates-dir \\
        gs://b/candidates --model cvae --split test --output gs://b/report/cvae_test.json \\
        --runner=DataflowRunner --project=P --region=R --temp_location=gs://b/tmp
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from typing import Any

import apache_beam as beam

from beam_jobs.options import pipeline_options
from recsys_cvae import candidates_format as C
from recsys_cvae import spec as S
from recsys_cvae.config import EvaluateConfig, load_config
from recsys_cvae.datasets.item_metadata import item_categories
from recsys_cvae.evaluation import scoring as Sc
from recsys_cvae.evaluation.evaluate import scoring_inputs


def _inputs(features_dir: str, split: str, protocol: str, config: EvaluateConfig):
    spec = S.FeatureSpec.load(features_dir)
    categories = item_categories(spec.item_vocabulary(), config.items_file)
    truth, _, context = scoring_inputs(spec, split, protocol, config, categories)
    return spec, truth, context


class _WithTruth(beam.DoFn):
    """Loads the split's truth once per worker (in setup), not once per element."""

    def __init__(self, features_dir: str, split: str, protocol: str, config: EvaluateConfig):
        self._args = (features_dir, split, protocol, config)

    def setup(self) -> None:
        spec, self.truth, self.context = _inputs(*self._args)
        self.vocabulary = Sc.item_vocabulary(spec.item_vocabulary())


class ScoreRowGroups(_WithTruth):
    """pyarrow Table (a row group) -> partial ModelScore."""

    def process(self, table):
        yield Sc.score_batch(table, self.truth, self.context, self.vocabulary)


class MergeScores(beam.CombineFn):
    """Adds partial ModelScores; the accumulator is the first one seen."""

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, score):
        return copy.deepcopy(score) if accumulator is None else accumulator.merge(score)

    def merge_accumulators(self, accumulators):
        merged = None
        for accumulator in accumulators:
            if accumulator is not None:
                merged = (
                    copy.deepcopy(accumulator) if merged is None else merged.merge(accumulator)
                )
        return merged

    def extract_output(self, accumulator):
        return accumulator


class Summarise(_WithTruth):
    """Total ModelScore (or None without any rows) -> the JSON-ready summary."""

    def process(self, score):
        if score is None:
            score = Sc.ModelScore.empty(self.truth, self.context)
        yield Sc.summarise(Sc.finish(score, self.truth, self.context), self.context)


class EvaluateCandidates(beam.PTransform):
    """Candidate Parquet files of one model and split -> one summary dict."""

    def __init__(
        self, features_dir: str, file_pattern: str, split: str, protocol: str,
        config: EvaluateConfig,
    ):
        super().__init__()
        self._pattern = file_pattern
        self._args = (features_dir, split, protocol, config)

    def expand(self, pipeline):
        return (
            pipeline
            | "ReadRowGroups" >> beam.io.ReadFromParquetBatched(
                self._pattern, columns=[C.USER_ID, C.ITEM_IDS]
            )
            | "ScoreRowGroups" >> beam.ParDo(ScoreRowGroups(*self._args))
            | "MergeScores" >> beam.CombineGlobally(MergeScores())
            | "Summarise" >> beam.ParDo(Summarise(*self._args))
        )


def run(argv=None, save_main_session=True, test_pipeline=None) -> dict[str, Any] | None:
    """Parses flags, runs the job, writes the summary JSON to --output; returns it when the
    output is local and readable (None otherwise)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features-dir", required=True)
    parser.add_argument("--candidates-dir", required=True)
    parser.add_argument("--model", required=True, help="model folder under --candidates-dir")
    parser.add_argument("--split", default=S.TEST)
    parser.add_argument("--protocol", default="", help="default: the one testing --split")
    parser.add_argument("--output", required=True, help="summary JSON path")
    parser.add_argument("--config", help="TOML config (the [evaluate] table is used)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    known, pipeline_args = parser.parse_known_args(argv)
    config = load_config(known.config, known.set).evaluate
    spec = S.FeatureSpec.load(known.features_dir)
    protocol = known.protocol or next(
        (p for p, roles in spec.protocols.items() if roles.get("test") == known.split),
        spec.protocol,
    )
    pattern = C.split_prefix(known.candidates_dir, known.model, known.split) + "-*-of-*.parquet"
    options = pipeline_options(pipeline_args, save_main_session)
    pipeline = test_pipeline or beam.Pipeline(options=options)
    _ = (
        pipeline
        | "Evaluate" >> EvaluateCandidates(
            known.features_dir, pattern, known.split, protocol, config
        )
        | "ToJson" >> beam.Map(lambda summary: json.dumps(summary, indent=2))
        | "WriteSummary" >> beam.io.WriteToText(
            known.output, shard_name_template="", num_shards=1
        )
    )
    result = pipeline.run()
    result.wait_until_finish()
    try:
        with open(known.output) as f:
            return json.load(f)
    except OSError:
        return None


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
