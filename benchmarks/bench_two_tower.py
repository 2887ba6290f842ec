"""Two-tower baseline: is the TFRS retrieval model a fair opponent? Old design against new.

    .venv/bin/python benchmarks/bench_two_tower.py --data-dir ../shared/datasets/ml-100k
    .venv/bin/python benchmarks/bench_two_tower.py --variant new           # only the current one
    .venv/bin/python benchmarks/bench_two_tower.py --items-file ""         # without item genres
    .venv/bin/python benchmarks/bench_two_tower.py --seeds 0 1 2           # spread over seeds

Why: a baseline that scores below popularity flatters every model compared with it. The
two-tower (`recsys_cvae.baselines.two_tower`) is the industry's default retrieval model, so
it has to be tuned until it is at least as good as the simple history baselines (item-kNN)
on the warm protocols, or the report has to say why not. This measures it next to item-kNN
and popularity, before and after its redesign, through the same code the pipeline runs.

Protocol: the real feature job (`beam_jobs.features.build_features`, `FeaturesConfig()`
defaults) builds the features once into a temporary folder (`--workdir` keeps and reuses
them). For each variant (`two_tower.VARIANTS`: `old` = the design before, `new` = the
module's `SETTINGS`), `recsys_cvae.baselines.build.build_baselines` fits two_tower, item_knn
and popularity once per protocol with a train split (strong, weak and temporal; the strong
fit also answers cold start), each on its train split and tuned on its validation split,
and writes their top 100; `recsys_cvae.evaluation.evaluate.evaluate` scores them. Item genres
come from `--items-file` (default: the data folder, as `evaluate.items_file` would). Fit
seconds are the wall time of each fit (`build.fit_baseline`), on whatever else the machine
is running. `--seeds` refits the two-tower with each `evaluate.seed` (its initialisation and
its draws of training pairs); item-kNN and popularity do not depend on it. Prints one
Markdown table (model × protocol: NDCG@10, Recall@20, fit seconds; with several seeds the
mean and the range) and writes `benchmarks/results/two_tower.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recsys_cvae  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from recsys_cvae import protocols as P  # noqa: E402
from recsys_cvae import spec as S  # noqa: E402
from recsys_cvae.baselines import build as B  # noqa: E402
from recsys_cvae.baselines import two_tower as T  # noqa: E402
from recsys_cvae.config import Config, EvaluateConfig  # noqa: E402

NAMES = ["two_tower", "item_knn", "popularity"]
COLUMNS = ("ndcg@10", "recall@20")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def features(data_dir: str, workdir: str) -> str:
    """The feature job's output folder for `data_dir` (built once, then reused)."""
    out = os.path.join(workdir, "features")
    if not os.path.exists(os.path.join(out, S.SPEC_FILE)):
        from beam_jobs.features import build_features
        from recsys_cvae.config import FeaturesConfig

        build_features(data_dir, out, FeaturesConfig(), save_main_session=False, quiet=True)
    return out


def run_variant(
    variant: str, features_dir: str, workdir: str, items_file: str, seed: int
) -> dict:
    """Fits the three baselines with two_tower in `variant`'s settings; evaluates them."""
    from recsys_cvae.evaluation.evaluate import evaluate

    spec = S.FeatureSpec.load(features_dir)
    settings = EvaluateConfig(
        baselines=NAMES, items_file=items_file, bootstrap_replicates=50, seed=seed
    )
    config = Config(evaluate=settings)
    # build_baselines fits every name for one protocol, then the next (baseline_plan's order).
    order = [(fit.protocol, name) for fit in P.baseline_plan(spec, config) for name in NAMES]
    seconds: list[float] = []
    fit_baseline = B.fit_baseline

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = fit_baseline(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    candidates = os.path.join(workdir, f"candidates_{variant}_{seed}")
    previous = T.SETTINGS
    T.SETTINGS, B.fit_baseline = T.VARIANTS[variant], timed
    try:
        B.build_baselines(features_dir, candidates, config, k=100, names=NAMES)
    finally:
        T.SETTINGS, B.fit_baseline = previous, fit_baseline
    metrics = evaluate(features_dir, candidates,
                       os.path.join(workdir, f"report_{variant}_{seed}"), settings)
    with open(os.path.join(candidates, "two_tower", B.PARAMS_FILE)) as f:
        chosen = json.load(f)
    fit_seconds = dict(zip(order, seconds))
    rows = []
    for split, protocol in P.evaluation_splits(spec, settings).items():
        fitted_by = next(f.protocol for f in P.baseline_plan(spec, config) if split in f.splits)
        for name in NAMES:
            scores = metrics["splits"][split][name]
            rows.append({
                "model": name if name != "two_tower" else f"two_tower ({variant})",
                "protocol": protocol, "split": split, "seed": seed, "users": scores["users"],
                **{c: scores[c] for c in COLUMNS},
                # Cold users are answered by the main protocol's fit: its time is counted there.
                "fit_seconds": None if fitted_by != protocol
                else round(fit_seconds[(protocol, name)], 1),
            })
    return {"settings": dataclasses.asdict(T.VARIANTS[variant]), "two_tower_params": chosen,
            "rows": rows}


def summary(rows: list[dict]) -> list[dict]:
    """One row per (model, split): the mean over seeds and the range of each column."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["split"]), []).append(r)
    out = []
    for same in groups.values():
        row = {k: same[0][k] for k in ("model", "protocol", "split", "users")}
        row["seeds"] = sorted({r["seed"] for r in same})
        for column in (*COLUMNS, "fit_seconds"):
            values = [r[column] for r in same if r[column] is not None]
            row[column] = sum(values) / len(values) if values else None
            row[f"{column}_range"] = [min(values), max(values)] if values else None
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    head = ["model", "protocol", "users", "seeds", "NDCG@10", "Recall@20", "fit s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|---:|"]

    def cell(row: dict, column: str, digits: int) -> str:
        if row[column] is None:
            return "–"
        low, high = row[f"{column}_range"]
        spread = f" ({low:.{digits}f}–{high:.{digits}f})" if len(row["seeds"]) > 1 else ""
        return f"{row[column]:.{digits}f}{spread}"

    for r in sorted(rows, key=lambda r: (PROTOCOL_ORDER.get(r["protocol"], 9), r["model"])):
        lines.append(f"| {r['model']} | {r['protocol']} | {r['users']} | {len(r['seeds'])} | "
                     f"{cell(r, 'ndcg@10', 4)} | {cell(r, 'recall@20', 4)} | "
                     f"{cell(r, 'fit_seconds', 1)} |")
    return "\n".join(lines)


PROTOCOL_ORDER = {S.STRONG: 0, S.WEAK: 1, "temporal": 2, S.COLD_START: 3}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/datasets/ml-100k")
    parser.add_argument("--workdir", default="", help="keep features and candidates here "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--variant", action="append", choices=sorted(T.VARIANTS),
                        help="repeatable; default: old and new")
    parser.add_argument("--items-file", default=None,
                        help="item metadata for the item tower's genres (default: --data-dir)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="evaluate.seed of each two-tower fit (default: 0)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "two_tower.json"))
    args = parser.parse_args(argv)
    variants = args.variant or ["old", "new"]
    items_file = args.data_dir if args.items_file is None else args.items_file

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_two_tower_") as scratch:
        workdir = args.workdir or scratch
        features_dir = features(args.data_dir, workdir)
        for variant in variants:
            for seed in args.seeds:
                runs[f"{variant}/{seed}"] = run_variant(
                    variant, features_dir, workdir, items_file, seed
                )

    # item_knn and popularity do not depend on the seed or the variant: counted once.
    rows, seen = [], set()
    for run in runs.values():
        for r in run["rows"]:
            key = (r["model"], r["split"], r["seed"] if r["model"].startswith("two_tower") else 0)
            if key not in seen:
                seen.add(key)
                rows.append(r)
    rows = summary(rows)
    print(f"\nData: {args.data_dir}; item metadata: {items_file or 'none'}; seeds "
          f"{args.seeds}; {os.cpu_count()} CPUs\n")
    print(table(rows))
    report = {"data_dir": args.data_dir, "items_file": items_file, "seeds": args.seeds,
              "cpus": os.cpu_count(), "summary": rows, "runs": runs}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=float)
    return report


if __name__ == "__main__":
    main()
