"""Synthesis throughput: the `sample` signature called in-process vs the `synthesize` Beam job.

Why: `recsys-cvae synthesize` is a Beam job so millions of users run on a runner; this
measures what the job costs over the bare signature on one machine (DirectRunner), users/s
for each, in the same run. Trains a small CVAE for one epoch on synthetic data first
(the model's quality does not matter here, only its shapes).

Example:
    python benchmarks/bench_synthesis.py --users 20000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import recsys_cvae  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

RESULTS = os.path.join(REPO, "benchmarks", "results", "bench_synthesis.json")
BATCH = 256


def in_process_rate(export_dir: str, features_dir: str, users: int) -> float:
    """Users/s of the signature alone, batches of BATCH users with training profiles."""
    import tensorflow as tf

    from beam_jobs.synthesize import training_population, user_seed
    from recsys_cvae import spec as S

    population = training_population(S.FeatureSpec.load(features_dir))
    sample = tf.saved_model.load(export_dir).signatures["sample"]
    specs = sample.structured_input_signature[1]
    rng = np.random.default_rng(0)
    chosen = [population[i] for i in rng.integers(len(population), size=users)]

    def batch(rows, start):
        inputs = {name: tf.constant([r.inputs[name] for r in rows], spec.dtype)
                  for name, spec in specs.items() if name not in ("num_items", "seed")}
        inputs["num_items"] = tf.constant([r.length for r in rows], tf.int32)
        inputs["seed"] = tf.constant([user_seed(0, start + i) for i in range(len(rows))],
                                     tf.int64)
        return inputs

    sample(**batch(chosen[:BATCH], 0))  # warm up
    started = time.perf_counter()
    for start in range(0, users, BATCH):
        sample(**batch(chosen[start:start + BATCH], start))["item_ids"].numpy()
    return users / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    from bench_serving import build_export

    from beam_jobs.synthesize import synthesize

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20000, help="synthetic users per path")
    parser.add_argument("--train-users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-synthesis-") as tmp:
        export_dir = build_export(tmp, args.train_users, args.items)
        features_dir = os.path.join(tmp, "features")
        signature = in_process_rate(export_dir, features_dir, args.users)
        started = time.perf_counter()
        written = synthesize(export_dir, features_dir, os.path.join(tmp, "synthetic"),
                             args.users, save_main_session=False)
        beam_seconds = time.perf_counter() - started
    rows = [
        {"path": "in-process `sample` signature", "users_per_s": signature,
         "share": 1.0},
        {"path": "synthesize (Beam DirectRunner, CSV written)",
         "users_per_s": args.users / beam_seconds, "share": args.users / beam_seconds / signature},
    ]
    print(f"\n{args.users:,} synthetic users, {written['interactions']:,} interactions; "
          f"{args.train_users:,} training users x {args.items:,} items")
    print("| path | users/s | share of in-process |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['path']} | {row['users_per_s']:,.0f} | {100 * row['share']:.0f}% |")
    result = {"users": args.users, "interactions": written["interactions"], "rows": rows,
              "beam_seconds": beam_seconds}
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
