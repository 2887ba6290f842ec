"""The report's figures, each a matplotlib Figure embedded as a base64 PNG (`image_tag`).

Why these rules: a figure is read at a glance, so nothing may hide data (legends sit below
the panels, not on them), what is the same is drawn once (baselines that coincide on a split,
such as EASE and item-kNN falling back to popularity for cold users, `coinciding`), a chart
with one bar says nothing (dropped), and a per-segment bar carries its users and its 95%
interval so a small segment's gap is not read as a finding.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from typing import Any

PLOT_METRICS = ("ndcg", "recall", "hitrate", "map")


def image_tag(alt: str, figure) -> str:
    """`<p><img>` with the figure inlined as PNG; closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>"


def label_order(label: str) -> tuple[float, str]:
    """Segment labels in numeric order when they start with a number ("5-19" < "20-49")."""
    head = label.split("-")[0].rstrip("+")
    try:
        return float(head), label
    except ValueError:
        return math.inf, label


def coinciding(split_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, list[str]]:
    """model -> the other models whose every metric equals its own on this split (the group
    is named by popularity when it is in it, else by its first name in sorted order); models
    alone map to []."""
    groups: dict[tuple, list[str]] = {}
    for name in sorted(split_metrics):
        key = tuple(sorted((k, round(v, 9)) for k, v in split_metrics[name].items()
                           if isinstance(v, (int, float))))
        groups.setdefault(key, []).append(name)
    # popularity stands for a group it is in: the others are the ones falling back to it
    ordered = [sorted(g, key=lambda n: (n != "popularity", n)) for g in groups.values()]
    return {names[0]: names[1:] for names in sorted(ordered)}


def shown_models(split_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """model drawn -> its legend label (`popularity = ease = item_knn` for a group)."""
    return {first: " = ".join([first, *rest]) for first, rest in coinciding(split_metrics).items()}


# One colour per model name across every figure of the report (matplotlib's tab10 order).
_PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
            "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
_KNOWN_ORDER = ("cvae", "ease", "item_knn", "popularity", "segment_popularity", "multvae",
                "two_tower")


def colour(model: str) -> str:
    """The model's colour: fixed for the known models, hashed into the palette otherwise."""
    if model in _KNOWN_ORDER:
        return _PALETTE[_KNOWN_ORDER.index(model)]
    return _PALETTE[len(_KNOWN_ORDER) + sum(map(ord, model)) % (len(_PALETTE) - len(_KNOWN_ORDER))]


def _legend_below(figure, axes) -> None:
    """One legend for the figure, under its panels, from the first panel's lines."""
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                  ncol=min(len(labels), 5), fontsize=8, frameon=False)


def _ks(split_metrics: Mapping[str, Mapping[str, float]], metric: str) -> list[int]:
    present = set().union(*(m.keys() for m in split_metrics.values()))
    return sorted(int(n.partition("@")[2]) for n in present if n.startswith(metric + "@"))


def curves_figure(metrics: Mapping[str, Any], split: str):
    """metric@K curves per model (coinciding ones once), one panel per PLOT_METRICS."""
    import matplotlib.pyplot as plt

    split_metrics = metrics["splits"][split]
    figure, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(4 * len(PLOT_METRICS), 3.2))
    for axis, metric in zip(axes, PLOT_METRICS):
        ks = _ks(split_metrics, metric)
        for name, label in shown_models(split_metrics).items():
            axis.plot(ks, [split_metrics[name][f"{metric}@{k}"] for k in ks], "o-", label=label,
                      color=colour(name))
        axis.set_xscale("log")
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_title(f"{metric}@K ({split})")
        axis.set_xlabel("K")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    _legend_below(figure, axes)
    return figure


def segment_metric(per_model: Mapping[str, Any]) -> str:
    """The ndcg@k the segment tables carry (k closest to 10), else mrr."""
    for attributes in per_model.values():
        for rows in attributes.values():
            for row in rows.values():
                return next((n for n in row if n.startswith("ndcg@")), "mrr")
    return "mrr"


def segments_figure(metrics: Mapping[str, Any], split: str, metric: str = ""):
    """Grouped bars of `metric` per segment and model with 95% intervals, one panel per
    attribute with two or more segments; tick labels carry each segment's users."""
    import matplotlib.pyplot as plt
    import numpy as np

    per_model = metrics.get("segments", {}).get(split, {})
    metric = metric or segment_metric(per_model)
    shown = {m: label for m, label in shown_models(metrics["splits"][split]).items()
             if m in per_model}
    labels_of = {
        a: sorted({lab for m in per_model.values() for lab in m.get(a, {})}, key=label_order)
        for a in sorted({a for m in per_model.values() for a in m})
    }
    attributes = [a for a, labels in labels_of.items() if len(labels) > 1]
    if not attributes or not shown:
        return None
    figure, axes = plt.subplots(
        len(attributes), 1, figsize=(10, 2.8 * len(attributes)), squeeze=False
    )
    width = 0.8 / len(shown)
    for axis, attribute in zip(axes[:, 0], attributes):
        labels = labels_of[attribute]
        x = np.arange(len(labels))
        users = {}
        for j, (model, legend) in enumerate(shown.items()):
            rows = per_model[model].get(attribute, {})
            values = np.array([rows.get(lab, {}).get(metric, 0.0) for lab in labels])
            intervals = [rows.get(lab, {}).get("ci", {}).get(metric) for lab in labels]
            # a percentile interval need not hold the mean (few replicates): clip at 0
            errors = np.maximum(np.array([[v - ci[0], ci[1] - v] if ci else [0.0, 0.0]
                                          for v, ci in zip(values, intervals)]).T, 0.0)
            axis.bar(x + j * width, values, width, label=legend, yerr=errors, color=colour(model),
                     error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#444"})
            for lab in labels:
                users.setdefault(lab, rows.get(lab, {}).get("users"))
        ticks = [f"{lab}\n{users[lab]} users" if users.get(lab) else lab for lab in labels]
        axis.set_xticks(x + width * (len(shown) - 1) / 2, ticks, fontsize=8)
        axis.set_title(f"{metric} by {attribute} ({split})")
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    _legend_below(figure, axes[:, 0])
    return figure


def tradeoff_figure(metrics: Mapping[str, Any], split: str, k: int = 10):
    """Coverage vs accuracy and popularity bias (mean popularity percentile, Gini)."""
    import matplotlib.pyplot as plt

    split_metrics = metrics["splits"][split]
    shown = shown_models(split_metrics)
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.6))
    for name, label in shown.items():
        row = split_metrics[name]
        accuracy = row.get(f"ndcg@{k}", 0)
        left.scatter(row.get(f"coverage@{k}", 0), accuracy, s=50, label=label, color=colour(name))
        middle.scatter(row.get(f"pop_pct@{k}", 0), accuracy, s=50, color=colour(name))
    left.set(xlabel=f"catalogue coverage@{k}", ylabel=f"ndcg@{k}", title="coverage vs accuracy")
    middle.set(
        xlabel=f"mean popularity percentile of top {k}", ylabel=f"ndcg@{k}",
        title="popularity bias vs accuracy",
    )
    names = list(shown)
    right.barh([shown[n] for n in names], [split_metrics[n].get(f"gini@{k}", 0) for n in names],
               color=[colour(n) for n in names])
    right.set(xlabel=f"Gini of exposure@{k} (0 = even)", title="exposure concentration")
    for axis in (left, middle, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    _legend_below(figure, [left])
    return figure
