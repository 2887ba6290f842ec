"""Large catalogues: full vs sampled softmax training, full vs chunked top-K serving.

    .venv/bin/python benchmarks/bench_catalogue.py --quick     # 8k and 27k items, few steps
    .venv/bin/python benchmarks/bench_catalogue.py             # 27k, 100k and 300k items

For each catalogue size, on synthetic data (a FeatureSpec with an item vocabulary, Zipf-like
histories of ML-20M's mean length, 144 items; no feature job), in one process:

    train    ms per `fit` training step (Keras's own train function: lookups, encoder,
             decoder, loss, Adam) with the full softmax and with sampled softmax
             (`model.sampled_softmax_negatives`), timed in alternating rounds on the same
             model and optimizer, so a shared machine's load hits both alike; |P| is the
             number of distinct history items of a batch (the sampled softmax's exact columns)
    serve    the `recommend` signature body (`export.ServingModule`, traced as the export
             traces it) with the whole catalogue at once (`top_k_chunk_size = 0`) and in
             chunks (the default `export.top_k_chunk_size`, 8,192 items): median latency
             for 1 user (ranked in one piece by either module: its logits are small) and for
             a batch of users, and the peak memory a batch call adds (TensorFlow's CPU
             allocator statistics: the call's own tensors, weights excluded). Serving is
             measured first, on the fresh model, as a serving process would load it.

A model at 300k items with the default 600 hidden units holds 2 × 720 MB of catalogue-sized
weights, four times over with Adam's moments and the gradients; the 300k row uses 200
hidden units (`--hidden-300k`). Prints a Markdown table and writes
`benchmarks/results/bench_catalogue.json` (with `os.getloadavg()`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import recsys_cvae  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)

# isort: split
import tensorflow as tf  # noqa: E402
from bench_train import HISTORY_LENGTH, synthetic_batches, synthetic_spec  # noqa: E402

from recsys_cvae import spec as S  # noqa: E402
from recsys_cvae.config import ExportConfig, ModelConfig  # noqa: E402
from recsys_cvae.export.saved_model import ServingModule  # noqa: E402
from recsys_cvae.model.cvae import build_model  # noqa: E402
from recsys_cvae.training.fit import adam  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FULL_SIZES = (26_744, 100_000, 300_000)
QUICK_SIZES = (8_000, 26_744)


def peak_added_mb(run) -> float:
    """The most memory TensorFlow's CPU allocator held during `run()` beyond what it held
    before (weights and optimizer slots excluded): the call's own tensors.

    The allocator's own statistics, not the resident set: oneDNN's CPU allocator caches
    freed blocks, so the resident set keeps the largest call seen so far.
    """
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    run()
    return (tf.config.experimental.get_memory_info("CPU:0")["peak"] - before) / 2**20


def measure_training(model, batch_size: int, negatives: int, steps: int, rounds: int) -> dict:
    """ms per step, full and sampled softmax, on one model (shared weights and Adam slots).

    The train step reads `model_config.sampled_softmax_negatives` when it is traced, so
    each train function is built (and traced) with the setting it measures.
    """
    batches = iter(synthetic_batches(model.spec.num_items, batch_size, 2 * steps + 4).repeat())
    functions = {}
    for name, n in (("full", 0), ("sampled", negatives)):
        model.model_config.sampled_softmax_negatives = n
        functions[name] = model.make_train_function(force=True)
        functions[name](batches)  # trace and warm up
    peaks = {f"{name}_peak_added_mb": peak_added_mb(lambda f=f: f(batches)["loss"].numpy())
             for name, f in functions.items()}
    seconds = {"full": 0.0, "sampled": 0.0}
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(per_round):
                function(batches)["loss"].numpy()
            seconds[name] += time.perf_counter() - start
    model.model_config.sampled_softmax_negatives = 0
    first = next(batches)[S.HISTORY]
    positives = int(tf.size(tf.unique(tf.boolean_mask(first, first != "")).y))
    return {f"{name}_ms": 1000 * s / (per_round * rounds) for name, s in seconds.items()} | {
        "positives_per_batch": positives, **peaks
    }


def serving_inputs(num_items: int, batch_size: int) -> dict[str, tf.Tensor]:
    batch = next(iter(synthetic_batches(num_items, batch_size, 1)))
    return {"item_ids": batch[S.HISTORY], "gender": batch["gender"], "age": batch["age"]}


def measure_serving(model, chunk_size: int, batch_size: int, calls: int) -> dict:
    """Median latency (1 user, `batch_size` users) and the peak memory a batch call adds."""
    module = ServingModule(model, top_k=100, chunk_size=chunk_size)
    recommend = module.recommend.get_concrete_function(module.recommend_specs())
    one = serving_inputs(model.spec.num_items, 1)
    many = serving_inputs(model.spec.num_items, batch_size)
    recommend(one)
    recommend(many)  # warm up both shapes
    result = {"chunk_size": module.chunk_size}
    for name, inputs in (("one_user", one), ("batch", many)):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            recommend(inputs)["scores"].numpy()
            times.append(time.perf_counter() - start)
        result[f"{name}_ms"] = 1000 * statistics.median(times)
    result["batch_peak_added_mb"] = peak_added_mb(lambda: recommend(many)["scores"].numpy())
    return result


def run_size(num_items: int, args) -> dict:
    hidden = args.hidden_300k if num_items >= 300_000 else args.hidden
    config = ModelConfig(hidden_dims=[hidden], linear_branch_max_items=0)
    with tempfile.TemporaryDirectory() as directory:
        spec = synthetic_spec(directory, num_items, num_users=100_000)
        model = build_model(spec, config)
        chunk = args.chunk_size or ExportConfig().top_k_chunk_size
        if chunk >= num_items:
            chunk = num_items // 4
        # Serving first, on the fresh model, as a serving process loads it.
        serving = {
            "full": measure_serving(model, 0, args.serve_batch, args.calls),
            "chunked": measure_serving(model, chunk, args.serve_batch, args.calls),
        }
        training = {}
        if not args.serve_only:
            model.compile(optimizer=adam(1e-3))
            model.beta.assign(0.2)
            training = measure_training(model, args.batch_size, args.negatives, args.steps,
                                        args.rounds)
    row = {"num_items": num_items, "hidden": hidden, "train": training, "serve": serving}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], args) -> str:
    lines = [
        f"train batch {args.batch_size}, sampled softmax {args.negatives} negatives "
        f"(log-uniform); serve top-100, batch {args.serve_batch}; "
        f"history length {HISTORY_LENGTH}; load {os.getloadavg()[0]:.1f}\n",
        "| items | hidden | \\|P\\| per batch | train step full (ms) | sampled (ms) | speed-up | "
        "step peak added full / sampled (MB) | "
        "chunk | recommend 1 user full / chunked (ms) | "
        f"recommend {args.serve_batch} users full / chunked (ms) | "
        f"peak added, {args.serve_batch} users, full / chunked (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, full, chunked = r["train"], r["serve"]["full"], r["serve"]["chunked"]
        lines.append(
            f"| {r['num_items']:,} | {r['hidden']} | {t['positives_per_batch']:,} | "
            f"{t['full_ms']:.0f} | {t['sampled_ms']:.0f} | "
            f"{t['full_ms'] / t['sampled_ms']:.1f}× | "
            f"{t['full_peak_added_mb']:.0f} / {t['sampled_peak_added_mb']:.0f} | "
            f"{chunked['chunk_size']:,} | "
            f"{full['one_user_ms']:.1f} / {chunked['one_user_ms']:.1f} | "
            f"{full['batch_ms']:.0f} / {chunked['batch_ms']:.0f} | "
            f"{full['batch_peak_added_mb']:.0f} / {chunked['batch_peak_added_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8k and 27k items, few steps")
    parser.add_argument("--sizes", type=int, nargs="*", help="catalogue sizes to run")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch")
    parser.add_argument("--negatives", type=int, default=2048, help="sampled negatives")
    parser.add_argument("--hidden", type=int, default=600, help="hidden units")
    parser.add_argument("--hidden-300k", type=int, default=200,
                        help="hidden units at 300k items and more (memory)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    parser.add_argument("--serve-batch", type=int, default=256, help="users per batch call")
    parser.add_argument("--calls", type=int, default=7, help="timed calls per latency")
    parser.add_argument("--serve-only", action="store_true", help="skip the training steps")
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="top-K chunk (0: export.top_k_chunk_size's default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds, args.calls = 2, 1, 3
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    started = time.time()
    rows = [run_size(n, args) for n in sizes]
    if not args.serve_only:
        print("\n" + table(rows, args))
    report = {"args": vars(args), "rows": rows, "loadavg": os.getloadavg(),
              "seconds": round(time.time() - started, 1)}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "bench_catalogue.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
