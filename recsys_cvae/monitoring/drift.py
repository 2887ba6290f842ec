"""Output monitoring: what the model recommends now against a reference, and the checks.

Why these quantities: a generative recommender can drift without any accuracy signal — it
starts recommending fewer distinct items, more popular ones, a different mix to one group of
users — and label-free measures of its output catch that on the day it happens. Each is
computed on both sets (`describe`) and compared (`compare`) against thresholds:

  coverage        distinct items recommended / items recommended in either set
  gini            Gini of exposure over those items (0: every item equally often; 1: one item)
  popularity      mean reference exposure share of the recommended items (higher: the model
                  leans on what the reference already recommended most)
  long_tail       share of recommendations outside the reference's head (the most exposed
                  items that make up half the reference's exposure)
  item_jsd        Jensen–Shannon divergence (base 2, 0..1) of the two item distributions
  item_psi        population stability index over ten bands of items, banded by reference
                  exposure (PSI < 0.1 stable, 0.1–0.25 moderate, > 0.25 a shift)
  score_psi       PSI of the top-1 score, over the reference's deciles
  segment_jsd     per attribute value (numeric attributes in reference quartiles), the JSD of
                  that segment's item distribution, for segments with enough users in both
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from recsys_cvae.config import MonitorConfig
from recsys_cvae.metrics import gini, jensen_shannon
from recsys_cvae.monitoring.outputs import Recommendations, exposure

EPSILON = 1e-6  # PSI's floor for an empty band


def _distribution(counts: Mapping[str, int], items: list[str]) -> np.ndarray:
    values = np.array([counts.get(i, 0) for i in items], dtype=np.float64)
    total = values.sum()
    return values / total if total else values


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two band distributions (shares summing to 1)."""
    r, c = np.maximum(reference, EPSILON), np.maximum(current, EPSILON)
    return float(np.sum((c - r) * np.log(c / r)))


def describe(recs: Recommendations, reference_counts: Mapping[str, int],
             catalogue: list[str]) -> dict[str, Any]:
    """The set's own figures; popularity and long tail measured against the reference."""
    counts = exposure(recs)
    total = sum(counts.values())
    reference_total = sum(reference_counts.values()) or 1
    head = _head(reference_counts)
    top1 = [row[0] for row in recs.scores if row]
    return {
        "source": recs.source, "kind": recs.kind, "users": recs.users,
        "recommendations": total,
        "mean_list_length": total / recs.users if recs.users else 0.0,
        "distinct_items": len(counts),
        "coverage": len(counts) / len(catalogue) if catalogue else 0.0,
        "gini": gini([counts.get(i, 0) for i in catalogue]),
        "popularity": (sum(n * reference_counts.get(i, 0) for i, n in counts.items())
                       / reference_total / total) if total else 0.0,
        "long_tail": (sum(n for i, n in counts.items() if i not in head) / total)
        if total else 0.0,
        "top1_score": _quantiles(top1),
    }


def _head(counts: Mapping[str, int]) -> set[str]:
    """The most exposed items that together make up half of the exposure."""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    total, running, head = sum(counts.values()), 0, set()
    for item, n in ordered:
        if running >= total / 2:
            break
        head.add(item)
        running += n
    return head


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p5": None, "p50": None, "p95": None}
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if not len(array):
        return {"mean": None, "p5": None, "p50": None, "p95": None}
    p5, p50, p95 = np.percentile(array, [5, 50, 95])
    return {"mean": float(array.mean()), "p5": float(p5), "p50": float(p50), "p95": float(p95)}


def _banded(counts: Mapping[str, int], bands: list[list[str]]) -> np.ndarray:
    shares = np.array([sum(counts.get(i, 0) for i in band) for band in bands], np.float64)
    return shares / shares.sum() if shares.sum() else shares


def _item_bands(reference_counts: Mapping[str, int], catalogue: list[str]) -> list[list[str]]:
    """Ten bands of items by reference exposure (items the reference never showed: a band
    of their own at the end)."""
    shown = sorted((i for i in catalogue if reference_counts.get(i, 0)),
                   key=lambda i: (-reference_counts[i], i))
    bands = [list(band) for band in np.array_split(np.array(shown, dtype=object), 10)
             if len(band)]
    unseen = [i for i in catalogue if not reference_counts.get(i, 0)]
    return bands + ([unseen] if unseen else [])


def _score_psi(reference: Recommendations, current: Recommendations) -> float | None:
    ref = np.array([row[0] for row in reference.scores if row], np.float64)
    cur = np.array([row[0] for row in current.scores if row], np.float64)
    ref, cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    if len(ref) < 10 or len(cur) < 10:
        return None
    edges = np.unique(np.percentile(ref, np.linspace(0, 100, 11)[1:-1]))
    return psi(np.bincount(np.searchsorted(edges, ref), minlength=len(edges) + 1) / len(ref),
               np.bincount(np.searchsorted(edges, cur), minlength=len(edges) + 1) / len(cur))


def _segment_labels(reference: Recommendations, current: Recommendations,
                    attribute: str) -> tuple[list[str], list[str]]:
    """Each user's segment of `attribute` in both sets: the value itself, or for a numeric
    attribute its quartile band of the reference's values."""
    ref_values, cur_values = reference.attributes[attribute], current.attributes[attribute]
    numbers = [v for v in ref_values + cur_values if v != ""]
    try:
        [float(v) for v in numbers]
    except ValueError:
        return ref_values, cur_values
    edges = np.unique(np.percentile([float(v) for v in ref_values if v != ""] or [0.0],
                                    [25, 50, 75]))

    def band(value: str) -> str:
        if value == "" or math.isnan(float(value)):
            return ""
        position = int(np.searchsorted(edges, float(value), side="right"))
        low = f"{edges[position - 1]:g}" if position > 0 else "-inf"
        high = f"{edges[position]:g}" if position < len(edges) else "inf"
        return f"[{low}, {high})"

    return [band(v) for v in ref_values], [band(v) for v in cur_values]


def _segments(reference: Recommendations, current: Recommendations, catalogue: list[str],
              min_users: int) -> list[dict[str, Any]]:
    rows = []
    for attribute in sorted(set(reference.attributes) & set(current.attributes)):
        ref_labels, cur_labels = _segment_labels(reference, current, attribute)
        for value in sorted(set(ref_labels) & set(cur_labels) - {""}):
            ref_rows = [r for r, v in enumerate(ref_labels) if v == value]
            cur_rows = [r for r, v in enumerate(cur_labels) if v == value]
            ref_counts = exposure(reference, ref_rows)
            cur_counts = exposure(current, cur_rows)
            enough = min(len(ref_rows), len(cur_rows)) >= min_users
            rows.append({
                "attribute": attribute, "segment": value,
                "reference_users": len(ref_rows), "current_users": len(cur_rows),
                "reference_distinct_items": len(ref_counts),
                "current_distinct_items": len(cur_counts),
                "jsd": jensen_shannon(_distribution(ref_counts, catalogue),
                                      _distribution(cur_counts, catalogue)) if enough else None,
            })
    return rows


def compare(reference: Recommendations, current: Recommendations,
            thresholds: MonitorConfig) -> dict[str, Any]:
    """Both sets' figures, the comparisons, and each check with its threshold and verdict
    (`thresholds`: the config's `[monitor]` table)."""
    ref_counts, cur_counts = exposure(reference), exposure(current)
    catalogue = sorted(set(ref_counts) | set(cur_counts))
    ref, cur = describe(reference, ref_counts, catalogue), describe(current, ref_counts,
                                                                    catalogue)
    bands = _item_bands(ref_counts, catalogue)
    segments = _segments(reference, current, catalogue, thresholds.min_segment_users)
    measured = {
        "item_jsd": jensen_shannon(_distribution(ref_counts, catalogue),
                                   _distribution(cur_counts, catalogue)),
        "item_psi": psi(_banded(ref_counts, bands), _banded(cur_counts, bands)),
        "score_psi": _score_psi(reference, current),
    }
    t = thresholds
    checks = [
        _check("item_jsd", measured["item_jsd"], t.item_jsd_max, "≤"),
        _check("item_psi", measured["item_psi"], t.item_psi_max, "≤"),
        _check("score_psi", measured["score_psi"], t.score_psi_max, "≤"),
        _check("coverage", cur["coverage"], (1 - t.coverage_drop_max) * ref["coverage"], "≥"),
        _check("gini", cur["gini"], ref["gini"] + t.gini_rise_max, "≤"),
        _check("popularity", cur["popularity"],
               (1 + t.popularity_rise_max) * ref["popularity"], "≤"),
    ]
    scored = [s for s in segments if s["jsd"] is not None]
    if scored:
        worst = max(scored, key=lambda s: s["jsd"])
        checks.append(_check("segment_jsd", worst["jsd"], t.segment_jsd_max, "≤",
                             f"{worst['attribute']}={worst['segment']}"))
    return {
        "reference": ref, "current": cur, "catalogue_items": len(catalogue),
        "measured": measured, "segments": segments, "checks": checks,
        "thresholds": dataclasses.asdict(thresholds),
        "passed": all(c["passed"] for c in checks),
    }


def _check(name: str, value: float | None, limit: float, relation: str,
           where: str = "") -> dict[str, Any]:
    if value is None:
        return {"name": name, "value": None, "limit": limit, "relation": relation,
                "passed": True, "note": "not enough data to measure", "where": where}
    passed = value <= limit + 1e-12 if relation == "≤" else value >= limit - 1e-12
    return {"name": name, "value": value, "limit": limit, "relation": relation,
            "passed": bool(passed), "where": where}
