"""Streaming evaluation at scale: N users x 100 candidates from Parquet, time and peak memory.

The issue's target is 1M users x 100 candidates within 2 minutes and bounded memory on this
machine. Synthetic data: items with Zipf-like popularity, ~10 targets and ~10 history items per
user, one categorical attribute (5 values) for the segment tables; candidates written as one
Parquet row group per 100k users. Only `recsys_cvae.evaluation.score_files` (the code path of
`recsys-cvae evaluate`) is timed; generating the files is reported separately.

    python benchmarks/bench_evaluate.py            # 1M users
    python benchmarks/bench_evaluate.py --quick    # 100k users
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_cvae import candidates_format as C
from recsys_cvae import metrics as M
from recsys_cvae.evaluation import scoring as Sc
from recsys_cvae.evaluation import stats as St
from recsys_cvae.evaluation.evaluate import score_files

ROW_GROUP_USERS = 100_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(num_users: int, num_items: int, k: int, path: str, seed: int = 0):
    """Writes the candidates file and returns (truth, items)."""
    rng = np.random.default_rng(seed)
    items = [f"i{i}" for i in range(num_items)]
    item_strings = pa.array(items, pa.string())
    p = 1.0 / np.arange(1, num_items + 1) ** 0.8
    p /= p.sum()
    writer = pq.ParquetWriter(path, C.SCHEMA)
    targets, histories = [], []
    for start in range(0, num_users, ROW_GROUP_USERS):
        n = min(ROW_GROUP_USERS, num_users - start)
        flat = rng.choice(num_items, size=n * k, p=p)
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        item_ids = pa.ListArray.from_arrays(offsets, item_strings.take(pa.array(flat)))
        scores = pa.ListArray.from_arrays(
            offsets, pa.array(np.sort(rng.random(n * k, dtype=np.float32))[::-1])
        )
        users = pa.array([f"u{start + i}" for i in range(n)], pa.string())
        model = pa.array(["synthetic"] * n, pa.string())
        writer.write_table(pa.table([users, item_ids, scores, model], schema=C.SCHEMA))
        targets.append(rng.choice(num_items, size=(n, 10), p=p))
        histories.append(rng.choice(num_items, size=(n, 10), p=p))
    writer.close()
    target = np.concatenate(targets)
    history = np.concatenate(histories)
    rows = np.arange(num_users, dtype=np.int64)[:, None]
    target_keys = np.unique(rows * num_items + target)
    num_relevant = np.bincount(target_keys // num_items, minlength=num_users)
    user_ids = np.array([f"u{i}" for i in range(num_users)], dtype=object)
    truth = Sc.Truth(
        user_ids=user_ids,
        num_relevant=num_relevant.astype(np.int64),
        target_keys=target_keys,
        history_keys=np.unique(rows * num_items + history),
        segments={
            "region": np.array(["north", "south", "east", "west", "unknown"], dtype=object)[
                rng.integers(0, 5, num_users)
            ],
            "activity": np.full(num_users, "5-19", dtype=object),
        },
        hashes=St.user_hashes(user_ids),
    )
    return truth, items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--replicates", type=int, default=200)
    parser.add_argument("--batch-rows", type=int, default=65536)
    parser.add_argument("--quick", action="store_true", help="100k users")
    args = parser.parse_args()
    users = 100_000 if args.quick else args.users
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "test-00000-of-00001.parquet")
        start = time.perf_counter()
        truth, items = synthetic(users, args.items, args.k, path)
        generate_s = time.perf_counter() - start
        rss_before = peak_rss_mb()
        counts = np.bincount(truth.target_keys % args.items, minlength=args.items)
        information, percentile = M.item_popularity_stats(counts, users)
        context = Sc.Context(
            M.DEFAULT_KS, args.items, information, percentile, None, args.replicates, 0
        )
        start = time.perf_counter()
        score = score_files([path], truth, context, items, batch_rows=args.batch_rows)
        summary = Sc.summarise(score, context)
        evaluate_s = time.perf_counter() - start
        size_mb = os.path.getsize(path) / 2**20
    result = {
        "users": users,
        "candidates_per_user": args.k,
        "items": args.items,
        "replicates": args.replicates,
        "batch_rows": args.batch_rows,
        "parquet_mb": round(size_mb, 1),
        "generate_s": round(generate_s, 1),
        "evaluate_s": round(evaluate_s, 1),
        "users_per_s": round(users / evaluate_s),
        "peak_rss_before_eval_mb": round(rss_before),
        "peak_rss_mb": round(peak_rss_mb()),
        "ndcg@10": round(summary["metrics"]["ndcg@10"], 5),
        "ndcg@10_ci": [round(v, 5) for v in summary["ci"]["ndcg@10"]],
        "metrics": len(summary["metrics"]),
    }
    print("| users | K | replicates | parquet MB | evaluate s | users/s | peak RSS MB "
          "(before eval) | ndcg@10 [95% CI] |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    print(
        f"| {users:,} | {args.k} | {args.replicates} | {result['parquet_mb']} | "
        f"{result['evaluate_s']} | {result['users_per_s']:,} | {result['peak_rss_mb']} "
        f"({result['peak_rss_before_eval_mb']}) | {result['ndcg@10']} {result['ndcg@10_ci']} |"
    )
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    name = "bench_evaluate_quick.json" if args.quick else "bench_evaluate.json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
