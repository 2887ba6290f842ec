"""Training throughput with MultiWorkerMirroredStrategy: 1 vs 2 local workers on the same data.

Builds features once from synthetic data (`--users`, `--items`), then trains the same CVAE
for `--epochs` epochs in fresh processes:

  1 worker, default strategy   both cores, no cluster (the reference)
  1 worker, 1 core             the same, pinned to one core (taskset): one worker's share
  2 workers, 1 core each       MultiWorkerMirroredStrategy, TF_CONFIG on 127.0.0.1 ports,
                               each worker pinned to its own core; gradients all-reduced
                               over gRPC every step

and reports training users per second from Keras' per-epoch seconds (the first epoch, which
traces the graphs, is left out of the rate). On two cores this measures the cost of the
collective (all-reduce of every gradient each step) against a perfectly split workload; it
says nothing about GPUs or a real network. Scaling efficiency = rate(2 workers) /
(2 × rate(1 worker, 1 core)).

    python benchmarks/bench_multiworker.py                    # ~10k users, a few minutes
    python benchmarks/bench_multiworker.py --users 3000 --epochs 2

Prints a Markdown table and writes benchmarks/results/bench_multiworker.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_e2e import parse_epoch_seconds  # noqa: E402

# name -> (label, workers, cores each worker is pinned to; None = not pinned)
SETUPS = {
    "2cores": ("1 worker, 2 cores (default strategy)", 1, [None]),
    "1core": ("1 worker, 1 core (default strategy)", 1, ["0"]),
    "2workers": ("2 workers, 1 core each (multi_worker)", 2, ["0", "1"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(features_dir: str, model_dir: str, epochs: int, strategy: str) -> list[str]:
    return [
        sys.executable, "-m", "recsys_cvae.cli", "train", "--workdir", os.path.dirname(model_dir),
        "--features-dir", features_dir, "--model-dir", model_dir, "--strategy", strategy,
        "--set", f"train.epochs={epochs}", "--set", "train.verbose=2",
        "--set", "train.early_stopping_patience=0",
        "--set", "train.serving_refit=false",  # one fit: its epoch lines alone are timed
    ]  # fmt: skip


def run_workers(commands: list[list[str]], envs: list[dict], cores: list[str | None],
                log_dir: str) -> list[str]:  # fmt: skip
    """Starts every command at once (pinned to its cores); returns their outputs in order.

    Each worker's output is also kept in log_dir/worker_<i>.log.
    """
    processes = []
    logs = []
    for index, (command, env, core) in enumerate(zip(commands, envs, cores)):
        log = open(os.path.join(log_dir, f"worker_{index}.log"), "w+")
        pinned = ["taskset", "-c", core, *command] if core is not None else command
        processes.append(subprocess.Popen(pinned, cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))  # fmt: skip
        logs.append(log)
    outputs = []
    for process, log in zip(processes, logs):
        process.wait(timeout=3600)
        log.seek(0)
        output = log.read()
        log.close()
        if process.returncode != 0:
            raise RuntimeError(f"a training worker failed:\n{output[-3000:]}")
        outputs.append(output)
    return outputs


def measure(name: str, features_dir: str, workdir: str, epochs: int, workers: int,
            cores: list[str | None], train_users: int) -> dict:  # fmt: skip
    run_dir = os.path.join(workdir, name.split(" (")[0].replace(" ", "_").replace(",", ""))
    model_dir = os.path.join(run_dir, "model")
    os.makedirs(run_dir, exist_ok=True)
    if workers == 1:
        commands = [train_command(features_dir, model_dir, epochs, "default")]
        envs = [{**os.environ, "TF_CONFIG": ""}]
    else:
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(workers)]
        commands = [train_command(features_dir, model_dir, epochs, "multi_worker")] * workers
        envs = [
            {**os.environ, "TF_CONFIG": json.dumps({
                "cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})}
            for i in range(workers)
        ]  # fmt: skip
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    outputs = run_workers(commands, envs, cores, os.path.dirname(model_dir))
    wall = time.perf_counter() - start
    epoch_s = parse_epoch_seconds(outputs[0])  # the chief's
    if len(epoch_s) != epochs:
        raise RuntimeError(f"{name}: expected {epochs} epoch lines, found {epoch_s}")
    steady = epoch_s[1:] or epoch_s
    mean_s = sum(steady) / len(steady)
    return {
        "setup": name, "workers": workers, "epoch_s": epoch_s, "wall_s": round(wall, 1),
        "users_per_s": round(train_users / mean_s, 1), "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000, help="synthetic users")
    parser.add_argument("--items", type=int, default=3_000, help="synthetic items")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per setup (first skipped)")
    parser.add_argument(
        "--setups", default="2cores,1core,2workers",
        help="which setups to run, comma-separated (default: 2cores,1core,2workers)",
    )  # fmt: skip
    parser.add_argument("--workdir", help="where data and models go (default: a temp folder)")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch traces and is left out)")
    chosen = [name for name in args.setups.split(",") if name]
    unknown = sorted(set(chosen) - set(SETUPS))
    if unknown:
        parser.error(f"unknown setups {unknown}; choose from {list(SETUPS)}")
    from beam_jobs.features import build_features
    from recsys_cvae.config import FeaturesConfig
    from recsys_cvae.datasets.synthetic import write_synthetic
    from recsys_cvae.spec import FeatureSpec

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_multiworker_")
    try:
        raw = write_synthetic(os.path.join(workdir, "data"), num_users=args.users,
                              num_items=args.items, mean_interactions=60.0)  # fmt: skip
        features_dir = os.path.join(workdir, "features")
        build_features(raw, features_dir, FeaturesConfig(protocols=["strong", "cold"]),
                       save_main_session=False, quiet=True)  # fmt: skip
        spec = FeatureSpec.load(features_dir)
        train_users = spec.splits[spec.protocol_split("train")].users
        rows = [
            measure(SETUPS[key][0], features_dir, workdir, args.epochs, SETUPS[key][1],
                    SETUPS[key][2], train_users)  # fmt: skip
            for key in chosen
        ]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    rate = {row["setup"]: row["users_per_s"] for row in rows}
    one_core, two_workers = rate.get(SETUPS["1core"][0]), rate.get(SETUPS["2workers"][0])
    efficiency = two_workers / (2 * one_core) if one_core and two_workers else None
    print(f"\n{train_users:,} training users, {spec.num_items:,} items, {args.epochs} epochs per "
          f"setup (rates leave out epoch 1); {os.cpu_count()} cores\n")  # fmt: skip
    print("| setup | epoch seconds | users/s | x first setup | load before |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['setup']} | {', '.join(f'{s:.0f}' for s in row['epoch_s'])} | "
              f"{row['users_per_s']:,.0f} | {row['users_per_s'] / rows[0]['users_per_s']:.2f} | "
              f"{row['load_before']:.1f} |")  # fmt: skip
    if efficiency is not None:
        print(f"\nScaling efficiency of 2 workers over 2 x (1 worker, 1 core): {efficiency:.2f}")
    result = {"train_users": train_users, "items": spec.num_items, "epochs": args.epochs,
              "rows": rows,
              "efficiency_2_workers": None if efficiency is None else round(efficiency, 3),
              "cores": os.cpu_count()}  # fmt: skip
    path = args.output or os.path.join(ROOT, "benchmarks", "results", "bench_multiworker.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
