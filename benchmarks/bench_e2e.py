"""The whole pipeline on ML-20M-sized synthetic data: each stage's wall time and peak memory.

Generates users with planted attribute structure (`recsys_cvae.datasets.synthetic`: 138,493
users, 26,744 items, ~20M interactions at `--scale 1`; `--scale` shrinks users and
interactions linearly and items by its square root), runs `recsys-cvae pipeline` on it in a
fresh process and collects what the pipeline's own stage table reports (seconds and peak
resident memory of the process tree per stage), the seconds of each training epoch (Keras
`verbose=2` lines), the final metrics, the benchmark's own sample of the process tree's
memory and the load average (other work on the machine slows every stage).

The configuration is what a user would pick at this size: an epochs cap (`--epochs`), the
strong and cold protocols only (one CVAE: `train.protocols` when the config has it; with
`--default-protocols` every protocol and a CVAE per protocol, as `pipeline` does unasked),
candidates for every user (every split of the primary protocol), and the baselines that fit
in memory at this catalogue size (`--baselines`; EASE's and ItemKNN's dense item-item
matrices do not).

    python benchmarks/bench_e2e.py --scale 0.05     # ~1M interactions, a few minutes
    python benchmarks/bench_e2e.py --scale 1        # ML-20M size, ~30-45 min

Prints Markdown tables and writes benchmarks/results/bench_e2e[_<scale>].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ML20M = {"users": 138_493, "items": 26_744, "interactions": 20_000_263}
# The goals at full scale (seconds; peak memory in GB).
GOALS_S = {"features": 420, "train epoch": 300, "candidates": 300, "evaluate": 120, "total": 2700}
GOAL_PEAK_GB = 12.0
# The generator's per-user counts are lognormal(log m, 0.5) (mean m·e^0.125), at least 5,
# and lose a few draws to repeats; this factor makes the total come out near ML-20M's.
MEAN_CORRECTION = 0.905


def sizes_for(scale: float) -> dict[str, float]:
    """Users, items and the generator's mean_interactions for a fraction of ML-20M."""
    users = max(200, round(ML20M["users"] * scale))
    items = max(100, round(ML20M["items"] * min(1.0, scale**0.5)))
    mean = ML20M["interactions"] / ML20M["users"] * MEAN_CORRECTION
    return {"users": users, "items": items, "mean_interactions": min(mean, items / 4)}


def generate(data_dir: str, scale: float, seed: int = 0) -> dict:
    """Writes the generic CSV layout into data_dir; returns sizes and seconds taken."""
    from recsys_cvae.datasets.synthetic import write_synthetic

    sizes = sizes_for(scale)
    start = time.perf_counter()
    write_synthetic(data_dir, num_users=sizes["users"], num_items=sizes["items"],
                    mean_interactions=sizes["mean_interactions"], seed=seed)  # fmt: skip
    seconds = time.perf_counter() - start
    with open(os.path.join(data_dir, "interactions.csv"), "rb") as f:
        rows = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b"")) - 1
    return {"users": sizes["users"], "items": sizes["items"], "interactions": rows,
            "generate_s": round(seconds, 1)}  # fmt: skip


def train_fields() -> set[str]:
    from recsys_cvae.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def pipeline_overrides(
    epochs: int, baselines: list[str], default_protocols: bool = False
) -> list[str]:
    """`--set` values for a run at this size (see the module docstring)."""
    overrides = [
        f"train.epochs={epochs}",
        "train.verbose=2",  # one line per epoch with its seconds
        'candidates.splits=["train", "validation", "test", "cold"]',
        "evaluate.baselines=[" + ", ".join(f'"{b}"' for b in baselines) + "]",
    ]
    if default_protocols:
        return overrides
    # One CVAE on the primary (strong) protocol, plus cold start: the weak protocol's splits
    # hold every user, so it triples the feature output, adds a CVAE and makes the baselines
    # rank ~140k more users per split (docs/scaling.md).
    overrides.append('features.protocols=["strong", "cold"]')
    if "protocols" in train_fields():
        overrides.append('train.protocols=["strong"]')
    return overrides


def run_measured(command: list[str], log_path: str) -> dict:
    """Runs command (stdout+stderr to log_path), sampling the process tree's RSS and the load."""
    from recsys_cvae.memory import tree_rss_bytes

    start = time.perf_counter()
    loads = []
    peak = 0
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            peak = max(peak, tree_rss_bytes(process.pid) or 0)
            if not loads or time.perf_counter() - loads[-1][0] >= 10:
                loads.append((time.perf_counter(), os.getloadavg()[0]))
            time.sleep(0.2)
    with open(log_path) as f:
        output = f.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    load_1m = [load for _, load in loads]
    return {
        "wall_s": time.perf_counter() - start,
        "peak_gb": peak / 1e9,
        "load_1m_mean": sum(load_1m) / max(len(load_1m), 1),
        "load_1m_max": max(load_1m, default=0.0),
        "output": output,
    }


EPOCH_LINE = re.compile(r"^(\d+)/\d+ - (\d+(?:\.\d+)?)s - ")
STEP_TIME = re.compile(r" - (\d+(?:\.\d+)?)(s|ms|us)/step")


def parse_stage_table(output: str) -> dict[str, dict[str, float | None]]:
    """The pipeline's 'Stage durations' table: stage -> {"seconds", "cpu_seconds", "peak_gb"}.

    Columns are found by their header, so older tables (seconds only) parse too; a missing
    or `-` value is None.
    """
    _, found, rest = output.partition("Stage durations")
    if not found:
        raise ValueError("no 'Stage durations' table in the pipeline's output")
    rows = []
    for line in rest.strip().splitlines():
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    keys = {"seconds": "seconds", "CPU seconds": "cpu_seconds", "peak RSS GB": "peak_gb"}
    header = [keys.get(name, name) for name in rows[0]] if rows else []
    stages = {}
    for cells in rows[2:]:
        values = dict(zip(header[1:], cells[1:]))
        stages[cells[0]] = {
            key: None if values.get(key, "-") == "-" else float(values[key])
            for key in keys.values()
        }
    if "total" not in stages:
        raise ValueError("the 'Stage durations' table has no total row")
    return stages


def parse_epoch_seconds(output: str) -> list[float]:
    """Seconds of each training epoch from Keras' verbose=2 lines.

    `41/41 - 21s - loss: ... - 514ms/step`: steps × time per step when Keras prints it in
    ms or µs (finer than the epoch's whole seconds); else the epoch's seconds (`2s/step` is
    rounded to whole seconds, far coarser than `116s`).
    """
    seconds = []
    for line in output.splitlines():
        match = EPOCH_LINE.match(line)
        if not match:
            continue
        step = STEP_TIME.findall(line)
        if step and step[-1][1] in ("ms", "us"):
            value, unit = step[-1]
            scale = {"ms": 1e-3, "us": 1e-6}[unit]
            seconds.append(round(int(match.group(1)) * float(value) * scale, 2))
        else:
            seconds.append(float(match.group(2)))
    return seconds


def headline_metrics(report_dir: str, splits: tuple[str, ...] = ("test", "cold")) -> dict:
    """split -> model -> {ndcg@10, recall@20, ...} from report/metrics.json (what exists)."""
    with open(os.path.join(report_dir, "metrics.json")) as f:
        metrics = json.load(f)
    names = ("ndcg@10", "ndcg@20", "recall@10", "recall@20")
    return {
        split: {
            model: {n: round(values[n], 4) for n in names if n in values}
            for model, values in metrics.get("splits", {}).get(split, {}).items()
        }
        for split in splits
        if split in metrics.get("splits", {})
    }


def metrics_table(metrics: dict) -> str:
    lines = []
    for split, models in metrics.items():
        columns = list(next(iter(models.values()), {}))
        lines += [f"| model ({split}) | " + " | ".join(columns) + " |",
                  "|---|" + "---:|" * len(columns)]  # fmt: skip
        ranked = sorted(models.items(), key=lambda kv: -kv[1].get(columns[0], 0) if columns else 0)
        lines += [f"| {m} | " + " | ".join(f"{v[c]:.4f}" for c in columns) + " |"
                  for m, v in ranked]  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def goals_table(stages: dict, epochs: list[float], peak_gb: float, full: bool) -> str:
    measured = {
        "features": stages.get("features", {}).get("seconds"),
        "train epoch": max(epochs) if epochs else None,
        "candidates": stages.get("candidates", {}).get("seconds"),
        "evaluate": stages.get("evaluate", {}).get("seconds"),
        "total": stages["total"]["seconds"],
    }
    lines = ["| goal (ML-20M size) | measured | goal | met |", "|---|---:|---:|---|"]
    for name, goal in GOALS_S.items():
        value = measured[name]
        met = "-" if value is None or not full else ("yes" if value <= goal else "no")
        shown = "-" if value is None else f"{value:.0f} s"
        lines.append(f"| {name} | {shown} | {goal} s | {met} |")
    met = "yes" if peak_gb <= GOAL_PEAK_GB else "no"
    lines.append(f"| peak memory | {peak_gb:.2f} GB | {GOAL_PEAK_GB:.0f} GB | "
                 f"{met if full else '-'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = ML-20M size")
    parser.add_argument("--epochs", type=int, default=3, help="train.epochs cap (default 3)")
    parser.add_argument(
        "--baselines", default="popularity,segment_popularity",
        help="comma-separated evaluate.baselines (default: popularity,segment_popularity)",
    )  # fmt: skip
    parser.add_argument(
        "--default-protocols", action="store_true",
        help="keep the default protocols (strong, weak, temporal, cold: a CVAE per protocol "
             "with a train split) instead of strong and cold only",
    )  # fmt: skip
    parser.add_argument("--workdir", help="where data and artefacts go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--set", action="append", default=[], help="extra pipeline --set")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/bench_e2e*.json)")
    args, beam_args = parser.parse_known_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_e2e_")
    data_dir = os.path.join(workdir, "data")
    try:
        sizes = generate(data_dir, args.scale)
        baselines = [b for b in args.baselines.split(",") if b]
        command = [
            sys.executable, "-m", "recsys_cvae.cli", "pipeline", "--data-dir", data_dir,
            "--workdir", os.path.join(workdir, "run"),
            *[x for o in pipeline_overrides(args.epochs, baselines, args.default_protocols)
              + args.set
              for x in ("--set", o)],
            *(["--", *beam_args] if beam_args else []),
        ]  # fmt: skip
        load_before = os.getloadavg()
        measured = run_measured(command, os.path.join(workdir, "pipeline.log"))
        stages = parse_stage_table(measured["output"])
        epochs = parse_epoch_seconds(measured["output"])
        metrics = headline_metrics(os.path.join(workdir, "run", "report"))
    finally:
        if not args.workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    peak_gb = max(measured["peak_gb"], max((s["peak_gb"] or 0) for s in stages.values()))
    full = args.scale >= 1.0
    print(f"\n{sizes['interactions']:,} interactions, {sizes['users']:,} users, "
          f"{sizes['items']:,} items (scale {args.scale}; generated in {sizes['generate_s']} s); "
          f"load average before {load_before[0]:.2f}, during mean "
          f"{measured['load_1m_mean']:.2f} / max {measured['load_1m_max']:.2f} on "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print("| stage | seconds | CPU seconds | peak RSS GB |\n|---|---:|---:|---:|")
    for name, stage in stages.items():
        cpu, peak = stage["cpu_seconds"], stage["peak_gb"]
        print(f"| {name} | {stage['seconds']:.1f} | {'-' if cpu is None else f'{cpu:.1f}'} | "
              f"{'-' if peak is None else f'{peak:.2f}'} |")  # fmt: skip
    print(f"\nTraining epochs (s): {', '.join(f'{s:.0f}' for s in epochs) or '-'}; "
          f"process-tree peak sampled by the benchmark: {measured['peak_gb']:.2f} GB\n")
    print(goals_table(stages, epochs, peak_gb, full))
    print("\n" + metrics_table(metrics))

    result = {
        "scale": args.scale,
        "default_protocols": args.default_protocols,
        "sizes": sizes,
        "command": command[1:],
        "stages": stages,
        "epoch_seconds": epochs,
        "wall_s": round(measured["wall_s"], 1),
        "peak_gb": round(peak_gb, 2),
        "benchmark_sampled_peak_gb": round(measured["peak_gb"], 2),
        "load_before": load_before,
        "load_1m_mean": round(measured["load_1m_mean"], 2),
        "load_1m_max": round(measured["load_1m_max"], 2),
        "cores": os.cpu_count(),
        "metrics": metrics,
        "goals_s": GOALS_S,
        "goal_peak_gb": GOAL_PEAK_GB,
    }
    suffix = ("" if full else f"_{args.scale:g}") + ("_all_protocols" if args.default_protocols
                                                      else "")
    path = args.output or os.path.join(ROOT, "benchmarks", "results", f"bench_e2e{suffix}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
