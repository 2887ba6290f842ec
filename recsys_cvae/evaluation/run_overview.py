"""The report's first sections: what the data was and how the served model's protocol trained.

Why in the report: a metrics table means little without the data it came from (how many
users and items, how sparse, how many rows were bad) and without the run behind it (did
training converge, which epoch was kept, with which settings). Both come from what the
earlier stages wrote: `feature_spec.json`'s counts, and the main protocol model's training
record (`model_dir.read_training_record`, handed in by the pipeline).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from typing import Any

from recsys_cvae import spec as S
from recsys_cvae.evaluation.figures import image_tag

# Loss terms and validation metrics drawn per epoch, when the history has them.
LOSS_TERMS = ("loss", "reconstruction", "kl")


def dataset_section(spec: S.FeatureSpec) -> str:
    """HTML: users, items, density, rows per file with their dead letters, users per split."""
    counts = spec.counts
    files = counts.get("files", {})
    interactions = next((stats["rows_valid"] for path, stats in files.items()
                         if not os.path.basename(path).startswith(("users", "u.user", "items",
                                                                   "u.item", "movies"))), 0)
    cells = spec.num_items * max(counts.get("users", 0), 1)
    rows = [
        ("users", f"{counts.get('users', 0):,}"),
        ("items", f"{spec.num_items:,}"),
        ("valid interaction rows", f"{interactions:,}"),
        ("density (interaction rows / users × items)", f"{interactions / cells:.3%}"),
        ("attributes", ", ".join(f"{a.name} ({a.kind})" for a in spec.attributes) or "none"),
    ]
    parts = ["<h2>Data</h2>", _table(("", "value"), rows)]
    file_rows = []
    for path, stats in files.items():
        reasons = ", ".join(f"{r} {n}" for r, n in stats.get("reasons", {}).items()) or "—"
        file_rows.append((os.path.basename(path), f"{stats['rows_read']:,}",
                          f"{stats['rows_valid']:,}", f"{stats['rows_dead_lettered']:,}", reasons))
    if file_rows:
        parts.append(_table(("file", "rows read", "valid", "dead letters", "reasons"),
                            file_rows))
    splits = counts.get("users_per_split", {})
    if splits:
        parts.append(_table(("split", "users"), [(s, f"{n:,}") for s, n in splits.items()]))
    return "\n".join(parts)


def training_section(record: Mapping[str, Any] | None) -> str:
    """HTML: loss terms and validation metrics per epoch with the kept epoch marked, what the
    post-training blends chose, and the resolved config; "" without a history.

    `record`: {"training": training_metrics.json, "config": config.json} of the model.
    """
    training = (record or {}).get("training") or {}
    history = training.get("history") or []
    if not history:
        return ""
    config = (record or {}).get("config") or {}
    protocol = config.get("train", {}).get("protocol", "")
    best = training.get("best_epoch")
    lines = [f"<h2>Training{f' ({html.escape(protocol)} protocol)' if protocol else ''}</h2>",
             f"<p>{len(history)} epochs run; the kept epoch is {best} "
             f"({html.escape(str(training.get('selection_metric', '')))} on validation).</p>"]
    lines.append(image_tag("training curves", training_figure(history, best)))
    chosen = [(f"{blend}: {key}", f"{value:.4g}" if isinstance(value, float) else str(value))
              for blend in ("linear_blend", "attribute_lift")
              for key, value in (training.get(blend) or {}).items()]
    if chosen:
        lines.append("<p>Chosen on validation after training (EASE and the low-pass filter "
                     "folded into the item-item branch; the attribute lift's weights):</p>")
        lines.append(_table(("setting", "value"), chosen))
    if config:
        shown = {k: v for k, v in config.items() if k not in ("features", "trained_on")}
        lines.append("<details><summary>The run's resolved config</summary>"
                     f"<pre>{html.escape(json.dumps(shown, indent=1))}</pre></details>")
    return "\n".join(lines)


def training_figure(history: list[Mapping[str, Any]], best_epoch: int | None):
    """Loss terms (train and validation) and validation ranking metrics per epoch."""
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    metrics = sorted({k.removeprefix("val_") for row in history for k in row
                      if k.startswith("val_") and "@" in k})
    terms = [t for t in LOSS_TERMS if any(t in row for row in history)]
    panels = len(terms) + (1 if metrics else 0)
    figure, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.0), squeeze=False)
    for axis, term in zip(axes[0], terms):
        axis.plot(epochs, [row.get(term) for row in history], "o-", ms=3, label="train")
        if any(f"val_{term}" in row for row in history):
            axis.plot(epochs, [row.get(f"val_{term}") for row in history], "o-", ms=3,
                      label="validation")
        axis.set_title(term)
    if metrics:
        axis = axes[0][-1]
        for metric in metrics:
            axis.plot(epochs, [row.get(f"val_{metric}") for row in history], "o-", ms=3,
                      label=metric)
        axis.set_title("validation ranking")
    for axis in axes[0]:
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if best_epoch:
            axis.axvline(best_epoch, color="grey", ls="--", lw=1)
        handles, labels = axis.get_legend_handles_labels()
        axis.legend(handles, labels, fontsize=7, loc="upper center", frameon=False,
                    bbox_to_anchor=(0.5, -0.22), ncol=len(labels))
    figure.tight_layout()
    return figure


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in rows]
    return "\n".join(out + ["</table>"])
