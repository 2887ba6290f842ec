"""What a MultiWorkerMirroredStrategy step costs: the training step next to a bare all-reduce
of exactly its gradients, in the same processes, for 1 and 2 local workers.

Why: `bench_multiworker.py` measured a scaling efficiency of 0.18 on two local workers and
blamed the collective without timing it. Here each worker builds the real compiled CVAE
under the strategy, takes one real batch, computes the step's gradients once (dense tensors
and, for the sparse first layer, IndexedSlices, as the optimizer hands them over) and then
times, N times each:

  step        the Keras train function (forward, backward, all-reduce, Adam) on that batch
  all-reduce  the exchange alone: `gradient_exchange.sum_over_replicas` of those tensors in
              the option's dtype, plus, when the item-item gradient is gathered, the
              all-gather of x and dy that replaces it

for each `--options` (CommunicationOptions, `train.gradient_dtype`, `train.item_item_gradient`).
Bytes per step are what one worker contributes (IndexedSlices: their values and indices). Goal of
issue 18: 2-worker step ≤ 1-worker step + 1.3 × all-reduce.

    python benchmarks/bench_allreduce.py --users 3000 --items 3000 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_multiworker import free_port  # noqa: E402

import recsys_cvae  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

OPTIONS = {  # name -> train settings (collective, pack bytes, gradient dtype, item-item)
    "auto": ("auto", 0, "float32", "dense"),
    "ring-pack-32MB": ("ring", 32 << 20, "float32", "dense"),  # the default before
    "bfloat16": ("ring", 32 << 20, "bfloat16", "dense"),
    "gathered": ("ring", 32 << 20, "float32", "gathered"),
    "gathered-bfloat16": ("ring", 32 << 20, "bfloat16", "gathered"),  # the default now
}


def worker(features_dir: str, option: str, steps: int, batch_size: int) -> dict:
    """Runs inside one worker process (TF_CONFIG set by the parent)."""
    import tensorflow as tf

    from recsys_cvae.config import Config
    from recsys_cvae.model.gradient_exchange import gather_rows, sum_over_replicas
    from recsys_cvae.spec import FeatureSpec
    from recsys_cvae.training.dataset import make_dataset
    from recsys_cvae.training.fit import _compiled_model
    from recsys_cvae.training.strategy import choose_strategy

    collective, pack, dtype_name, item_item = OPTIONS[option]
    strategy = choose_strategy("multi_worker", 1, collective, pack)
    spec = FeatureSpec.load(features_dir)
    config = Config()
    replicas = strategy.num_replicas_in_sync
    config.train.batch_size = batch_size * replicas
    config.train.gradient_dtype, config.train.item_item_gradient = dtype_name, item_item
    model = _compiled_model(strategy, spec, config)
    dtype = tf.as_dtype(dtype_name)
    dataset = make_dataset(spec, spec.protocol_split("train"), batch_size * replicas).take(1)
    options = tf.data.Options()  # one batch, the same on every worker: timing, not learning
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = dataset.with_options(options)
    batch = next(iter(strategy.experimental_distribute_dataset(dataset.cache().repeat())))
    branch = model.item_item
    gathered = branch is not None and branch.gather_dtype is not None

    # This replica's own gradients, without any exchange (the branch's as a dense matrix).
    if branch is not None:
        branch.gather_dtype = None

    @tf.function
    def gradients_of(data):
        def replica(features):
            with tf.GradientTape() as tape:
                loss = model._loss_and_update(model._elbo(features, training=True))
            return tape.gradient(loss, model.trainable_variables)
        return strategy.run(replica, args=(data,))

    local = strategy.experimental_local_results(gradients_of(batch))[0]
    if branch is not None and gathered:
        branch.gather_dtype = dtype
    is_branch = [branch is not None and v is branch.weights_matrix
                 for v in model.trainable_variables]  # fmt: skip
    size = dtype.size
    sent = 0
    for g, skip in zip(local, is_branch):
        if skip and gathered:
            sent += 2 * batch_size * spec.num_items * size  # x and dy, gathered
        elif isinstance(g, tf.IndexedSlices):
            sent += int(tf.size(g.values)) * size + int(tf.size(g.indices)) * 8
        elif g is not None:
            sent += int(tf.size(g)) * size

    # IndexedSlices go in as their parts and are rebuilt inside the replica function: the
    # strategy cannot take them as arguments.
    parts = [(g.values, g.indices, g.dense_shape) if isinstance(g, tf.IndexedSlices) else g
             for g in local]
    factor = tf.ones([batch_size, spec.num_items])

    @tf.function
    def exchange():
        def replica():  # captured, not passed: MWMS cannot all-reduce a run() argument as is
            rebuilt = [tf.IndexedSlices(*[tf.identity(t) for t in g]) if isinstance(g, tuple)
                       else None if g is None else tf.identity(g) for g in parts]
            out = sum_over_replicas(rebuilt, [s and gathered for s in is_branch], dtype)
            if gathered:  # what the branch's backward pass sends: x and dy
                out += gather_rows([tf.identity(factor), tf.identity(factor)], dtype)
            return [o for o in out if o is not None]
        return strategy.run(replica)

    exchange()  # traces
    started = time.perf_counter()
    for _ in range(steps):
        out = exchange()
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t,
                          strategy.experimental_local_results(out)[0])
    reduce_s = (time.perf_counter() - started) / steps

    train = model.make_train_function()
    iterator = iter(strategy.experimental_distribute_dataset(dataset.cache().repeat()))
    train(iterator)  # traces
    started = time.perf_counter()
    for _ in range(steps):
        logs = train(iterator)
    float(logs["loss"])
    step_s = (time.perf_counter() - started) / steps
    return {"option": option, "workers": replicas, "bytes_per_step": sent,
            "all_reduce_s": reduce_s, "step_s": step_s,
            "sparse_gradients": sum(isinstance(g, tf.IndexedSlices) for g in local)}


def run(features_dir: str, option: str, workers: int, steps: int, batch_size: int) -> dict:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(workers)]
    processes = []
    for index in range(workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(
            {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})}
        command = [sys.executable, __file__, "--worker", features_dir, "--option", option,
                   "--steps", str(steps), "--batch-size", str(batch_size)]
        core = ["taskset", "-c", str(index)]  # one core each, as bench_multiworker
        processes.append(subprocess.Popen(core + command, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=1800)
        if process.returncode:
            raise RuntimeError(f"worker failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=3000, help="synthetic users")
    parser.add_argument("--items", type=int, default=3000, help="synthetic items")
    parser.add_argument("--steps", type=int, default=10, help="timed repetitions")
    parser.add_argument("--batch-size", type=int, default=128, help="per-worker batch")
    parser.add_argument("--options", default=",".join(OPTIONS),
                        help=f"CommunicationOptions to compare: {', '.join(OPTIONS)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--option", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results",
                                                         "bench_allreduce.json"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.option, args.steps, args.batch_size)))
        return
    from beam_jobs.features import build_features
    from recsys_cvae.config import FeaturesConfig
    from recsys_cvae.datasets.synthetic import write_synthetic

    workdir = tempfile.mkdtemp(prefix="bench_allreduce_")
    raw = write_synthetic(os.path.join(workdir, "data"), num_users=args.users,
                          num_items=args.items, mean_interactions=60.0)
    features_dir = os.path.join(workdir, "features")
    build_features(raw, features_dir, FeaturesConfig(protocols=["strong", "cold"]),
                   save_main_session=False, quiet=True)
    rows = [run(features_dir, option, workers, args.steps, args.batch_size)
            for option in args.options.split(",") for workers in (1, 2)]
    print(f"\n{args.items:,} items, per-worker batch {args.batch_size}, {args.steps} timed "
          f"steps, each worker pinned to one core\n")
    print("| options | workers | MB sent per step | bare all-reduce s | step s | "
          "step − 1-worker step | ÷ all-reduce |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    single = {}
    for row in rows:
        if row["workers"] == 1:
            single[row["option"]] = row["step_s"]
        extra = row["step_s"] - single[row["option"]]
        ratio = extra / row["all_reduce_s"] if row["workers"] > 1 and row["all_reduce_s"] else 0
        print(f"| {row['option']} | {row['workers']} | {row['bytes_per_step'] / 1e6:.1f} | "
              f"{row['all_reduce_s']:.3f} | {row['step_s']:.3f} | {extra:+.3f} | "
              f"{ratio:.2f} |")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"rows": rows, "items": args.items, "batch_size": args.batch_size}, f,
                  indent=2)


if __name__ == "__main__":
    main()
