"""Batch candidates at the speed limit: Beam RunInference vs in-process calls vs the FLOP limit.

Why: the candidates job (`beam_jobs/candidates.py`) should cost little more than the model's
own arithmetic. This benchmark builds synthetic features (most users in the test split, 10%
cold), exports an untrained CVAE of the default shape (speed does not depend on the weights),
and measures users/s of the same work three ways:

  beam          `generate_candidates` end to end (read TFRecords, RunInference, write Parquet),
                DirectRunner in memory, and with --direct_running_mode=multi_processing
                (2 workers; `+shared`: one model per machine, share_model_across_processes)
  in-process    the SavedModel loaded with `tf.saved_model.load`, `recommend` on the test
                users and `generate` on the cold users, same batches, inputs prepared up
                front (`signature`), or parsed from the serialized examples in the same
                call as the job does (`parse+signature`)
  flop limit    a bare `tf.matmul` chain of the decoder's layer shapes plus `tf.math.top_k`
                at the same batch size: what the hardware allows for the decoder alone

Goal: Beam in memory >= 70% of in-process `signature`. The in-process figure is measured
before and after the Beam runs (the machine is shared; their spread is the noise).

Example:
    python benchmarks/bench_candidates.py --quick
    python benchmarks/bench_candidates.py --users 138493
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import recsys_cvae  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

RESULTS = os.path.join(REPO, "benchmarks", "results", "bench_candidates.json")
MULTI_PROCESSING = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
BEAM_MODES = {
    "in_memory": ([], False),
    "multi_processing": (MULTI_PROCESSING, False),
    "multi_processing+shared": (MULTI_PROCESSING, True),
}
SPLITS = {"test": "recommend", "cold": "generate"}


def build_data(folder: str, users: int, items: int) -> tuple[str, str]:
    """Synthetic users -> Beam features -> untrained default CVAE -> export; reused if present.

    Returns (features dir, export version dir).
    """
    from beam_jobs.features import build_features
    from recsys_cvae import spec as S
    from recsys_cvae.config import ExportConfig, FeaturesConfig, ModelConfig
    from recsys_cvae.datasets.synthetic import write_synthetic
    from recsys_cvae.export.saved_model import write_export
    from recsys_cvae.export_layout import newest_export
    from recsys_cvae.model.cvae import build_model

    features = os.path.join(folder, "features")
    if not os.path.exists(os.path.join(features, "feature_spec.json")):
        raw = write_synthetic(os.path.join(folder, "raw"), num_users=users, num_items=items)
        config = FeaturesConfig(test_fraction=0.8, validation_fraction=0.05, cold_fraction=0.1,
                                protocols=["strong", "cold"])  # fmt: skip
        build_features(raw, features, config, save_main_session=False, quiet=True)
        shutil.rmtree(raw)
    export_base = os.path.join(folder, "export")
    export_dir = newest_export(export_base)
    if export_dir is None:
        model = build_model(S.FeatureSpec.load(features), ModelConfig())
        export_dir = write_export(model, export_base, ExportConfig().top_k)
    return features, export_dir


def read_batches(features: str, split: str, batch_size: int) -> list[list[bytes]]:
    import tensorflow as tf

    from recsys_cvae import spec as S

    files = tf.io.gfile.glob(S.FeatureSpec.load(features).split_pattern(split))
    records = list(tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator())
    return [records[i : i + batch_size] for i in range(0, len(records), batch_size)]


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (multi_processing workers).

    Why: the machine is shared, so wall time swings with other people's jobs; CPU time per
    user is the steadier measure of how much work each path does.
    """
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def timed(work) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `work()`."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    work()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def time_calls(calls: list) -> tuple[float, float]:
    """(wall, CPU) seconds for one pass over `calls` (no-argument callables), after one
    warm-up call (tracing)."""
    calls[0]()
    return timed(lambda: [call() for call in calls])


def in_process(features: str, export_dir: str, batch_size: int) -> dict[str, dict]:
    """Bare signature (inputs prepared up front) and parse+signature: users/s, users/CPU-s."""
    import tensorflow as tf

    from beam_jobs.signature_inference import SignatureRunner, parse_users
    from recsys_cvae import spec as S

    spec = S.FeatureSpec.load(features)
    loaded = tf.saved_model.load(export_dir)
    users, seconds = 0, {"signature": [0.0, 0.0], "parse+signature": [0.0, 0.0]}
    for split, signature in SPLITS.items():
        batches = read_batches(features, split, batch_size)
        users += sum(len(b) for b in batches)
        function = loaded.signatures[signature]
        inputs = [parse_users(tf.constant(b), spec, signature == "recommend")[1] for b in batches]
        runner = SignatureRunner(export_dir, signature, spec)
        paths = {
            "signature": [lambda x=x: function(**x) for x in inputs],
            "parse+signature": [lambda b=b: runner.predict(b) for b in batches],
        }
        for name, calls in paths.items():
            wall, cpu = time_calls(calls)
            seconds[name][0] += wall
            seconds[name][1] += cpu
    return {name: rates(users, wall, cpu) for name, (wall, cpu) in seconds.items()}


def rates(users: int, wall: float, cpu: float) -> dict[str, float]:
    return {"users_per_s": users / wall, "users_per_cpu_s": users / cpu}


def flop_limit(export_dir: str, batch_size: int, batches: int) -> dict:
    """users/s of the decoder's matmul chain + top-K, and its FLOPs per user."""
    import numpy as np
    import tensorflow as tf

    from recsys_cvae.config import ModelConfig

    with open(os.path.join(export_dir, "assets.extra", "feature_spec.json")) as f:
        num_items = json.load(f)["items"]["size"]
    model = ModelConfig()  # the shape build_data exports
    shapes = [model.latent_dim + model.condition_dim, *model.hidden_dims, num_items]
    rng = np.random.default_rng(0)
    weights = [tf.constant(rng.normal(0, 0.05, (a, b)).astype(np.float32))
               for a, b in zip(shapes[:-1], shapes[1:])]  # fmt: skip
    x = tf.constant(rng.normal(size=(batch_size, shapes[0])).astype(np.float32))
    top_k = min(100, num_items)

    @tf.function
    def decode(h):
        for w in weights[:-1]:
            h = tf.tanh(tf.matmul(h, w))
        return tf.math.top_k(tf.matmul(h, weights[-1]), k=top_k)

    result = rates(batches * batch_size, *time_calls([lambda: decode(x).values.numpy()] * batches))
    flops = sum(2 * a * b for a, b in zip(shapes[:-1], shapes[1:]))
    return {**result, "layer_shapes": shapes, "mflop_per_user": flops / 1e6,
            "gflop_per_s": flops * result["users_per_s"] / 1e9}  # fmt: skip


def beam_run(features: str, export_dir: str, output: str, config, mode: str, module=None) -> dict:
    """users/s of `generate_candidates` end to end (model load included); `module` is the job
    module to run (default: the working tree's `beam_jobs.candidates`)."""
    if module is None:
        from beam_jobs import candidates as module

    args, shared = BEAM_MODES[mode]
    config = dataclasses.replace(config, splits=list(SPLITS), share_model_across_processes=shared)
    written = {}

    def work():
        written.update(module.generate_candidates(
            export_dir, features, output, config, pipeline_args=list(args),
            save_main_session=False))  # fmt: skip

    wall, cpu = timed(work)
    return rates(sum(written.values()), wall, cpu)


def module_at(ref: str):
    """`beam_jobs/candidates.py` as it was at git revision `ref`, imported under its own name."""
    source = subprocess.run(["git", "-C", REPO, "show", f"{ref}:beam_jobs/candidates.py"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    path = os.path.join(tempfile.mkdtemp(prefix="candidates_before_"), f"candidates_{ref}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"candidates_{ref}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    from recsys_cvae.config import CandidatesConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=60000, help="synthetic users")
    parser.add_argument("--items", type=int, default=27000, help="synthetic catalogue")
    parser.add_argument("--batch-size", type=int, default=CandidatesConfig().max_batch_size,
                        help="users per model call (min = max batch size)")  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=list(BEAM_MODES), choices=list(BEAM_MODES))
    parser.add_argument("--before", default="", metavar="GIT_REF",
                        help="also run the job as it was at GIT_REF (in memory, its defaults)")
    parser.add_argument("--workdir", default="", help="keep data here and reuse it (default: temp)")
    parser.add_argument("--quick", action="store_true", help="3,000 users, in-memory Beam only")
    args = parser.parse_args()
    if args.quick:
        args.users, args.modes = 3000, ["in_memory"]

    folder = args.workdir or tempfile.mkdtemp(prefix="bench_candidates_")
    os.makedirs(folder, exist_ok=True)
    features, export_dir = build_data(folder, args.users, args.items)
    with open(os.path.join(features, "feature_spec.json")) as f:
        spec = json.load(f)
    sizes = {"users": sum(spec["counts"]["users_per_split"][s] for s in SPLITS),
             "items": spec["items"]["size"], "batch_size": args.batch_size}  # fmt: skip
    load = [os.getloadavg()]
    output = os.path.join(folder, "candidates")
    tuned = CandidatesConfig(min_batch_size=args.batch_size, max_batch_size=args.batch_size)

    before = in_process(features, export_dir, args.batch_size)
    beam = {}
    if args.before:
        beam[f"in_memory, before ({args.before})"] = beam_run(
            features, export_dir, output, CandidatesConfig(), "in_memory", module_at(args.before))
        load.append(os.getloadavg())
    for mode in args.modes:
        beam[mode] = beam_run(features, export_dir, output, tuned, mode)
        load.append(os.getloadavg())
    after = in_process(features, export_dir, args.batch_size)
    limit = flop_limit(export_dir, args.batch_size, max(1, sizes["users"] // args.batch_size))
    load.append(os.getloadavg())
    if not args.workdir:
        shutil.rmtree(folder, ignore_errors=True)

    rows = [{"path": f"beam {mode}", **r} for mode, r in beam.items()]
    for name in before:  # mean of the runs before and after Beam; both kept
        mean = {k: (before[name][k] + after[name][k]) / 2 for k in before[name]}
        rows.append({"path": f"in-process {name}", **mean, "runs": [before[name], after[name]]})
    rows.append({"path": "flop limit (decoder matmuls + top-K)",
                 **{k: limit[k] for k in ("users_per_s", "users_per_cpu_s")}})  # fmt: skip
    reference = next(r for r in rows if r["path"] == "in-process signature")
    for row in rows:
        row["share_of_signature"] = row["users_per_s"] / reference["users_per_s"]
        row["share_of_signature_cpu"] = row["users_per_cpu_s"] / reference["users_per_cpu_s"]

    print(f"\n{sizes['users']:,} users ({sizes['items']:,} items), batch {args.batch_size}; "
          f"decoder {limit['layer_shapes']} = {limit['mflop_per_user']:.1f} MFLOP/user, "
          f"{limit['gflop_per_s']:.0f} GFLOP/s at the limit; load {load[0][0]:.1f}..."
          f"{max(x[0] for x in load):.1f}\n")  # fmt: skip
    print("| path | users/s | share of in-process signature | users/CPU-s | share (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['path']} | {row['users_per_s']:,.0f} | {row['share_of_signature']:.0%} | "
              f"{row['users_per_cpu_s']:,.0f} | {row['share_of_signature_cpu']:.0%} |")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    name = RESULTS.replace(".json", "_quick.json") if args.quick else RESULTS
    with open(name, "w") as f:
        json.dump({"sizes": sizes, "flop_limit": limit, "rows": rows, "loadavg": load}, f, indent=2)
    print(f"\nwrote {name}")


if __name__ == "__main__":
    main()
