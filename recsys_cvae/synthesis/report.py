"""Fidelity and privacy of synthetic users against the real data (`synthesis_report.json`).

Why both, measured: synthetic logs are only worth sharing or training on if they look like
the real ones where it matters (which items, for which segment, how many) and carry no real
user's history. Each figure sits next to what the real data itself gives, so "good" has a
scale:

Fidelity
  popularity_spearman   rank correlation of item counts, real training users vs synthetic
  segments              per attribute value (numeric: quartiles of the real values), the
                        Jensen–Shannon divergence of the item distribution between one random
                        half of the segment's real users and as many synthetic users, next to
                        the JSD between the two real halves (the noise floor); ratio ≤ 1.5 is
                        the goal; and the overlap of the two top-10 item lists
  lengths               history-length quantiles, real vs synthetic
  train_on_synthetic    EASE and popularity fitted on the synthetic log, scored (NDCG@10) on
                        the real test users (history in, held-out items as truth), as a ratio
                        to the same models fitted on the real training users (EASE's λ chosen
                        on the real validation users for each)
Privacy
  nearest_real          each synthetic user's most similar real user (Jaccard of item sets);
                        exact copies (similarity 1) must be 0; `closer_than_real` is the share
                        of synthetic users nearer their nearest real user than the median real
                        user is to its nearest other real user (well under 0.5: no copying)
  membership_auc        can a user's likelihood under the generator (p(x|c): the prior and
                        decoder synthetic users are drawn from) tell the protocol model's
                        training users from its held-out test users? ≤ 0.6 is the goal;
                        `membership_auc_recommend_path` is the same test on the recommend
                        path's reconstruction, which ranking is meant to fit
                        (`recsys_cvae.synthesis.membership`)

Large data: at most `MAX_USERS` users of each kind are compared (a seeded sample).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from recsys_cvae import spec as S
from recsys_cvae import user_records as UR
from recsys_cvae.metrics import jensen_shannon, ndcg_at_k
from recsys_cvae.model.ease import ease_from_gram
from recsys_cvae.protocols import refit_splits
from recsys_cvae.ranking import top_unseen
from recsys_cvae.synthesis.item_sets import item_matrix
from recsys_cvae.synthesis.membership import membership_auc

MAX_USERS = 20_000
MIN_SEGMENT_USERS = 20
EASE_LAMBDAS = (10.0, 100.0, 500.0, 1000.0)
GOALS = {"segment_jsd_ratio_max": 1.5, "train_on_synthetic_ease_min": 0.7,
         "exact_copies_max": 0, "membership_auc_max": 0.6}


def _users(spec: S.FeatureSpec, splits: Sequence[str]) -> list[dict]:
    users = []
    for split in splits:
        if split in spec.splits:
            users.extend(UR.read_user_records(spec, split))
    return users


def _read_synthetic(folder: str) -> tuple[list[dict[str, str]], dict[str, list[str]]]:
    with open(os.path.join(folder, "users.csv"), newline="") as f:
        profiles = list(csv.DictReader(f))
    items: dict[str, list[str]] = {}
    with open(os.path.join(folder, "interactions.csv"), newline="") as f:
        for row in csv.DictReader(f):
            items.setdefault(row["user_id"], []).append(row["item_id"])
    return profiles, items


def _distribution(x: np.ndarray) -> np.ndarray:
    counts = x.sum(axis=0).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(v, kind="stable"), kind="stable") for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def _segments(real_values: Mapping[str, list], synthetic_values: Mapping[str, list],
              numeric: Mapping[str, bool]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(attribute, segment, real user mask, synthetic user mask) per attribute value, numeric
    attributes in quartiles of the real values."""
    out = []
    for name, is_numeric in numeric.items():
        real, synthetic = real_values[name], synthetic_values[name]
        if is_numeric:
            known = np.array([float(v) for v in real if v not in ("", None)
                              and not math.isnan(float(v))])
            if not len(known):
                continue
            edges = np.unique(np.percentile(known, [25, 50, 75]))
            bounds = [-np.inf, *edges, np.inf]

            def band(values, low, high):
                return np.array([v not in ("", None) and low <= float(v) < high
                                 for v in values])

            for low, high in zip(bounds[:-1], bounds[1:]):
                out.append((name, f"[{low:g}, {high:g})", band(real, low, high),
                            band(synthetic, low, high)))
        else:
            for value in sorted({str(v) for v in real} - {""}):
                out.append((name, value, np.array([str(v) == value for v in real]),
                            np.array([str(v) == value for v in synthetic])))
    return out


def fidelity(real: np.ndarray, synthetic: np.ndarray, real_attributes: Mapping[str, list],
             synthetic_attributes: Mapping[str, list], numeric: Mapping[str, bool],
             seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rows, skipped = [], 0
    everyone = [("all", "all", np.ones(len(real), bool), np.ones(len(synthetic), bool))]
    for name, segment, real_mask, synthetic_mask in everyone + _segments(
            real_attributes, synthetic_attributes, numeric):
        real_rows = rng.permutation(np.flatnonzero(real_mask))
        synthetic_rows = np.flatnonzero(synthetic_mask)
        half = len(real_rows) // 2
        if half < MIN_SEGMENT_USERS // 2 or len(synthetic_rows) < half:
            skipped += name != "all"  # too few real users, or fewer synthetic than half
            continue
        a, b = real[real_rows[:half]], real[real_rows[half:2 * half]]
        s = synthetic[rng.choice(synthetic_rows, half, replace=False)]
        floor = jensen_shannon(_distribution(a), _distribution(b))
        divergence = jensen_shannon(_distribution(a), _distribution(s))
        top_real = set(np.argsort(-real[real_rows].sum(0), kind="stable")[:10])
        top_synthetic = set(np.argsort(-synthetic[synthetic_rows].sum(0), kind="stable")[:10])
        rows.append({"attribute": name, "segment": segment, "real_users": int(real_mask.sum()),
                     "synthetic_users": int(synthetic_mask.sum()), "jsd": divergence,
                     "noise_floor": floor, "ratio": divergence / floor if floor else None,
                     "top10_overlap": len(top_real & top_synthetic) / 10})
    lengths = {name: {q: float(np.percentile(x.sum(1), q)) for q in (10, 50, 90)}
               | {"mean": float(x.sum(1).mean())} for name, x in (("real", real),
                                                                   ("synthetic", synthetic))}
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None and r["attribute"] != "all"]
    return {"popularity_spearman": _spearman(real.sum(0), synthetic.sum(0)),
            "segments": rows, "lengths": lengths, "skipped_segments": skipped,
            "worst_segment_ratio": max(ratios) if ratios else None,
            "mean_segment_ratio": float(np.mean(ratios)) if ratios else None}


def _ndcg(scores: np.ndarray, history: np.ndarray, truth: np.ndarray) -> float:
    order, _ = top_unseen(scores, history > 0, 10)
    hits = np.take_along_axis(truth, np.maximum(order, 0), axis=1) * (order >= 0)
    return float(ndcg_at_k(hits.astype(np.float64), truth.sum(1).astype(np.int64), 10).mean())


def train_on_synthetic(real: np.ndarray, synthetic: np.ndarray,
                       validation: tuple[np.ndarray, np.ndarray],
                       test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """NDCG@10 on the real test users of EASE and popularity fitted on each source."""
    scores: dict[str, dict[str, float]] = {}
    for source, x in (("real", real), ("synthetic", synthetic)):
        gram = x.T.astype(np.float64) @ x
        best = max(EASE_LAMBDAS, key=lambda l2: _ndcg(
            validation[0] @ ease_from_gram(gram, l2), *validation))
        weights = ease_from_gram(gram, best)
        popularity = np.tile(x.sum(0), (len(test[0]), 1))
        scores[source] = {"ease": _ndcg(test[0] @ weights, *test), "ease_lambda": best,
                          "popularity": _ndcg(popularity, *test)}
    return {**scores, "ease_ratio": scores["synthetic"]["ease"] / scores["real"]["ease"]
            if scores["real"]["ease"] else None,
            "popularity_ratio": scores["synthetic"]["popularity"] / scores["real"]["popularity"]
            if scores["real"]["popularity"] else None}


def _max_jaccard(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Each row of `a`'s largest Jaccard similarity to a row of `b` (item sets)."""
    best = np.zeros(len(a))
    sizes_b = b.sum(1)
    for start in range(0, len(a), 2048):
        block = a[start:start + 2048]
        inter = block @ b.T
        union = block.sum(1)[:, None] + sizes_b[None, :] - inter
        similarity = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        if exclude_self:
            rows = np.arange(len(block))
            similarity[rows, start + rows] = -1.0
        best[start:start + len(block)] = similarity.max(1)
    return best


def privacy(real: np.ndarray, synthetic: np.ndarray) -> dict[str, Any]:
    nearest = _max_jaccard(synthetic, real)
    real_nearest = _max_jaccard(real, real, exclude_self=True)
    median_real = float(np.median(real_nearest))
    return {"exact_copies": int(np.sum(nearest >= 1.0 - 1e-9)),
            "nearest_real_jaccard": {"mean": float(nearest.mean()),
                                     "p50": float(np.median(nearest)),
                                     "p99": float(np.percentile(nearest, 99))},
            "real_to_real_jaccard": {"mean": float(real_nearest.mean()), "p50": median_real},
            "closer_than_real": float(np.mean(nearest > median_real))}


def synthesis_report(features_dir: str, synthetic_dir: str, export_dir: str = "",
                     membership_model_dir: str = "", seed: int = 0,
                     restricted: bool = False) -> dict[str, Any]:
    """The report's figures (module docstring), with the goals and which are met.
    `export_dir` (the generator) is recorded, and whether it trained on the real test users
    (the served refit did: train-on-synthetic is then optimistic; a protocol export did not)."""
    spec = S.FeatureSpec.load(features_dir)
    rng = np.random.default_rng(seed)
    items = spec.item_vocabulary()
    index = {item: i for i, item in enumerate(items)}
    inputs = S.serving_inputs(spec)
    numeric = {i.name: not i.is_categorical for i in inputs}
    train, validation, test = (spec.protocol_split(role)
                               for role in ("train", "validation", "test"))
    every = list(refit_splits(spec) or spec.splits)
    by_split = {split: _users(spec, [split]) for split in {*every, train, validation, test}}
    real_users = [user for split in every for user in by_split[split]]
    real_users = [real_users[i] for i in rng.permutation(len(real_users))[:MAX_USERS]]
    real = item_matrix([u[S.HISTORY] + u[S.TARGETS] for u in real_users], index)
    real_profiles = [S.inputs_from_attributes(spec, u) for u in real_users]
    profiles, synthetic_items = _read_synthetic(synthetic_dir)
    profiles = [profiles[i] for i in rng.permutation(len(profiles))[:MAX_USERS]]
    synthetic = item_matrix([synthetic_items.get(p["user_id"], []) for p in profiles], index)
    real_attributes = {n: [p[n] for p in real_profiles] for n in numeric}
    synthetic_attributes = {n: [p.get(n, "") for p in profiles] for n in numeric}

    def held_out(split: str) -> tuple[np.ndarray, np.ndarray]:
        users = [u for u in by_split[split] if u[S.TARGETS]]
        return item_matrix([u[S.HISTORY] for u in users], index), item_matrix(
            [u[S.TARGETS] for u in users], index)

    trained_on = _trained_on(export_dir)
    report = {
        "export_dir": export_dir,
        "membership_model": membership_model_dir or None,
        # --set / --population: the synthetic users are a chosen population, compared here
        # with every real user, so the fidelity figures measure the choice as much as the model
        "restricted_population": restricted,
        "generator_saw_test_users": bool(trained_on.get("refit_of")) or (
            test in trained_on.get("splits", [])),
        "real_users": len(real_users), "synthetic_users": len(profiles),
        "fidelity": fidelity(real, synthetic, real_attributes, synthetic_attributes, numeric,
                             seed),
        "privacy": privacy(real, synthetic),
    }
    report["train_on_synthetic"] = train_on_synthetic(
        item_matrix([u[S.HISTORY] + u[S.TARGETS] for u in by_split[train]], index), synthetic,
        held_out(validation), held_out(test))
    aucs = membership_auc(membership_model_dir, spec, seed=seed) if membership_model_dir else None
    report["privacy"]["membership_auc"] = aucs and aucs["generator"]
    report["privacy"]["membership_auc_recommend_path"] = aucs and aucs["recommend_path"]
    report["goals"] = _goals(report)
    return report


def _trained_on(export_dir: str) -> dict:
    """The export's provenance `trained_on` (read as the file it is: this role does not
    import the exporter)."""
    path = os.path.join(export_dir, "assets.extra", "provenance.json") if export_dir else ""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("trained_on") or {}


def _goals(report: Mapping[str, Any]) -> dict[str, Any]:
    fidelity_, privacy_ = report["fidelity"], report["privacy"]
    worst = fidelity_["worst_segment_ratio"]
    ease = report["train_on_synthetic"]["ease_ratio"]
    auc = privacy_["membership_auc"]
    return {
        "segment_jsd_within_1.5x_floor": None if worst is None
        else worst <= GOALS["segment_jsd_ratio_max"],
        "train_on_synthetic_ease_at_least_0.7": None if ease is None
        else ease >= GOALS["train_on_synthetic_ease_min"],
        "no_exact_copies": privacy_["exact_copies"] <= GOALS["exact_copies_max"],
        "membership_auc_at_most_0.6": None if auc is None else auc <= GOALS["membership_auc_max"],
    }
