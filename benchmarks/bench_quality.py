"""Quality: the CVAE against Mult-VAE, EASE and popularity baselines on the same splits.

    .venv/bin/python benchmarks/bench_quality.py --data-dir ../shared/datasets/ml-100k
    .venv/bin/python benchmarks/bench_quality.py --quick          # fewer epochs, to try things
    .venv/bin/python benchmarks/bench_quality.py --set model.latent_dim=64 --set train.epochs=80

Builds the features once (cached in `--workdir`), then fits on the protocol's train split
and tunes on its validation split:

    cvae                the CVAE with `recsys-cvae pipeline`'s defaults (+ any --set)
    multvae             the same model and settings with use_condition=False (Mult-VAE)
    ease                EASE, λ chosen on validation NDCG@10 (recsys_cvae.baselines.build)
    popularity          global popularity
    segment_popularity  popularity within the best attribute segment (chosen on validation)

Warm users (the protocol's test split) are ranked from their history with their own history
excluded; cold-start users (the `cold` split) from attributes alone (`generate` for the
CVAE). Prints one Markdown table and writes `benchmarks/results/bench_quality.json`.
The goal (issue 4): cvae NDCG@10 ≥ ease on the warm users; cvae ≥ segment_popularity cold.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recsys_cvae  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS first)
from recsys_cvae import spec as S  # noqa: E402
from recsys_cvae.baselines import build as B  # noqa: E402
from recsys_cvae.baselines import rankings as Rk  # noqa: E402
from recsys_cvae.baselines import split_data as SD  # noqa: E402
from recsys_cvae.config import Config, EvaluateConfig, load_config  # noqa: E402
from recsys_cvae.metrics import score_rankings  # noqa: E402

KS = (10, 20, 50)
COLUMNS = ("ndcg@10", "recall@20", "recall@50")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def features(data_dir: str, workdir: str, rebuild: bool = False) -> S.FeatureSpec:
    """The feature job's output for `data_dir` (built once, then reused from `workdir`)."""
    out = os.path.join(workdir, "features")
    if rebuild or not os.path.exists(os.path.join(out, S.SPEC_FILE)):
        from beam_jobs.features import build_features
        from recsys_cvae.config import FeaturesConfig

        build_features(data_dir, out, FeaturesConfig(), save_main_session=False, quiet=True)
    return S.FeatureSpec.load(out)


def protocol_splits(spec: S.FeatureSpec, protocol: str) -> dict[str, str]:
    """{train, validation, test, cold} split names for `protocol` (cold: the cold protocol)."""
    splits = {role: spec.protocol_split(role, protocol) for role in S.ROLES}
    if S.COLD_START in spec.protocols:
        splits["cold"] = spec.protocol_split("test", S.COLD_START)
    return splits


def model_rankings(model, spec: S.FeatureSpec, split: str, generate: bool) -> dict[str, list]:
    """user id → top max(KS) item ids from the CVAE (history excluded)."""
    import tensorflow as tf

    from recsys_cvae.training.dataset import make_dataset

    items = np.array(model.item_ids, dtype=object)
    k = min(max(KS), len(items))

    @tf.function
    def top(batch):
        logits = model.generate_logits(batch) if generate else model.recommend_logits(batch)
        seen = model.history_mask(batch[S.HISTORY]) > 0
        return tf.math.top_k(tf.where(seen, -np.inf, logits), k=k).indices

    ranked = {}
    for batch in make_dataset(spec, split, batch_size=512):
        for user, row in zip(batch[S.USER_ID].numpy(), top(batch).numpy()):
            ranked[user.decode()] = list(items[row])
    return ranked


def truth_of(spec: S.FeatureSpec, split: str) -> dict[str, set[str]]:
    from recsys_cvae.evaluation.evaluate import load_truth

    return load_truth(spec, split)[0]


def score(ranked: dict[str, list], truth: dict[str, set[str]], num_items: int) -> dict:
    result = score_rankings(ranked, truth, KS, num_items)
    return {c: result[c] for c in COLUMNS}


def train_cvae(spec: S.FeatureSpec, config: Config, model_dir: str, splits: dict) -> dict:
    """Fits one CVAE configuration; returns its validation, warm and cold metrics."""
    import shutil

    from recsys_cvae.model.model_dir import load_trained_model
    from recsys_cvae.training.fit import train

    shutil.rmtree(model_dir, ignore_errors=True)
    start = time.time()
    fitted = train(spec.directory, model_dir, config)
    model = load_trained_model(model_dir)
    row = {
        # After the item-item blend when there is one: the score of the weights kept.
        "validation_ndcg@10": (fitted.get("linear_blend") or {}).get(
            "validation_ndcg@10", fitted.get("ndcg@10", float("nan"))
        ),
        "best_epoch": fitted["best_epoch"],
        "best_beta": fitted["best_beta"],
        "seconds": round(time.time() - start, 1),
        "warm": score(model_rankings(model, spec, splits["test"], False),
                      truth_of(spec, splits["test"]), spec.num_items),
    }
    if "cold" in splits:
        row["cold"] = score(model_rankings(model, spec, splits["cold"], True),
                            truth_of(spec, splits["cold"]), spec.num_items)
    return row


def baseline_rows(spec: S.FeatureSpec, splits: dict) -> dict[str, dict]:
    """EASE (λ tuned), popularity and segment popularity on the same splits."""
    items = spec.item_vocabulary()
    index = {item: i for i, item in enumerate(items)}
    data = {role: SD.load_split(spec, split, index) for role, split in splits.items()}
    evaluate_config = EvaluateConfig()
    scorers = {
        name: B.fit_baseline(name, spec, data["train"], data["validation"], items, evaluate_config)
        for name in ("ease", "popularity", "segment_popularity")
    }
    rows = {}
    for name, (scorer, params) in scorers.items():
        row = {"params": {k: v for k, v in params.items() if k in ("l2", "attributes")}}
        for role in ("test", "cold"):
            if role not in data:
                continue
            ranked, _ = Rk.rankings(scorer, data[role], items, max(KS))
            by_user = dict(zip(data[role].user_ids, ranked))
            row["warm" if role == "test" else "cold"] = score(by_user, data[role].truth, len(items))
        rows[name] = row
    return rows


def table(rows: dict[str, dict]) -> str:
    head = ["model", *(f"warm {c}" for c in COLUMNS), *(f"cold {c}" for c in COLUMNS), "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [name]
        for part in ("warm", "cold"):
            cells += [f"{row[part][c]:.4f}" if part in row else "–" for c in COLUMNS]
        notes = row.get("params") or {
            k: row[k] for k in ("best_epoch", "best_beta", "seconds") if k in row
        }
        cells.append(", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in notes.items()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="/work/shared/datasets/ml-100k")
    parser.add_argument("--workdir", default="/tmp/bench_quality")
    parser.add_argument("--protocol", default="", help="default: weak if built, else strong")
    parser.add_argument("--quick", action="store_true", help="15 epochs, for trying settings")
    parser.add_argument("--rebuild", action="store_true", help="rerun the feature job")
    parser.add_argument("--skip-multvae", action="store_true")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)

    spec = features(args.data_dir, args.workdir, args.rebuild)
    protocol = args.protocol or (S.WEAK if S.WEAK in spec.protocols else S.STRONG)
    splits = protocol_splits(spec, protocol)
    config = load_config(None, ["train.verbose=0", f"train.protocol={protocol}",
                                *(["train.epochs=15"] if args.quick else []), *args.overrides])
    rows = {"cvae": train_cvae(spec, config, os.path.join(args.workdir, "cvae"), splits)}
    if not args.skip_multvae:
        plain = copy.deepcopy(config)
        plain.model.use_condition = False
        rows["multvae"] = train_cvae(spec, plain, os.path.join(args.workdir, "multvae"), splits)
    rows.update(baseline_rows(spec, splits))

    print(f"\nML data: {args.data_dir}; protocol {protocol!r} {splits}\n")
    print(table(rows))
    os.makedirs(RESULTS, exist_ok=True)
    report = {"protocol": protocol, "splits": splits, "overrides": args.overrides,
              "config": config.to_dict(), "rows": rows}
    with open(os.path.join(RESULTS, "bench_quality.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    return report


if __name__ == "__main__":
    main()
