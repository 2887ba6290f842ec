"""The evaluation report: Markdown tables and a self-contained HTML page with plots.

Why separate from the scoring: the report only reads `metrics.json`-shaped dicts, so it can be
rebuilt from a stored metrics file, and the numbers it shows are exactly the ones saved.
The HTML embeds every matplotlib figure as a base64 PNG, so the page is one file that can be
mailed or attached to a review. The what-if panel loads the newest CVAE export with
`tf.saved_model.load` (never `recsys_cvae.model.cvae`) and calls its `generate` signature.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from recsys_cvae import spec as S
from recsys_cvae.evaluation.figures import (
    coinciding,
    curves_figure,
    image_tag,
    label_order,
    segment_metric,
    segments_figure,
    tradeoff_figure,
)
from recsys_cvae.evaluation.run_overview import dataset_section, training_section
from recsys_cvae.evaluation.whatif import what_if_panel

# Columns of the Markdown tables, in order; those not in the metrics are left out.
TABLE_COLUMNS = (
    "ndcg@10", "recall@20", "nrecall@20", "map@10", "hitrate@10", "precision@10", "mrr",
    "coverage@10", "gini@10", "novelty@10", "pop_pct@10", "ild@10",
)
LOWER_IS_BETTER = ("gini", "pop_pct")


def table_columns(split_metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    """TABLE_COLUMNS present in the metrics; when none with a cut-off are (other ks), every
    metric in the order ndcg, recall, precision per k, then mrr, then coverage per k."""
    present: set[str] = set().union(*(m.keys() for m in split_metrics.values()))
    columns = [c for c in TABLE_COLUMNS if c in present]
    if any("@" in c for c in columns):
        return columns
    ks = sorted({int(n.partition("@")[2]) for n in present if "@" in n})
    ordered = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall", "precision")]
    ordered += ["mrr"] + [f"coverage@{k}" for k in ks]
    return [c for c in ordered if c in present]


def _best(values: list[float], column: str) -> float:
    lower = column.partition("@")[0] in LOWER_IS_BETTER
    return min(values) if lower else max(values)


def format_table(metrics: Mapping[str, Any], split: str, with_ci: bool = False) -> str:
    """A Markdown table of one split: models as rows (best first by the first column),
    `users` and `missing`, then the metric columns with the best value per column in bold
    (lowest for gini and popularity percentile); `with_ci` adds the 95% interval."""
    split_metrics = metrics.get("splits", {}).get(split)
    if split_metrics is None:
        raise ValueError(
            f"split {split!r} is not in the metrics; they have {sorted(metrics.get('splits', {}))}"
        )
    if not split_metrics:
        return f"(no model has candidates for split {split!r})\n"
    columns = table_columns(split_metrics)
    best = {
        c: _best([m[c] for m in split_metrics.values() if c in m], c) for c in columns
    }
    intervals = metrics.get("ci", {}).get(split, {})
    models = sorted(split_metrics, key=lambda n: (-split_metrics[n].get(columns[0], 0.0), n))
    lines = [
        "| model | users | missing | " + " | ".join(columns) + " |",
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for name in models:
        row = split_metrics[name]
        cells = []
        for column in columns:
            value = row.get(column)
            text = "n/a" if value is None else f"{value:.4f}"
            ci = intervals.get(name, {}).get(column)
            if with_ci and ci and not math.isnan(ci[0]):
                text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
            cells.append(f"**{text}**" if value is not None and value == best[column] else text)
        lines.append(
            f"| {name} | {int(row.get('users', 0))} | {int(row.get('users_missing', 0))} | "
            + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def format_segments(metrics: Mapping[str, Any], split: str, metric: str = "") -> str:
    """One Markdown table per attribute: segment labels as rows, models as columns."""
    per_model = metrics.get("segments", {}).get(split, {})
    if not per_model:
        return ""
    metric = metric or segment_metric(per_model)
    models = sorted(per_model)
    attributes = sorted({a for m in per_model.values() for a in m})
    parts = []
    for attribute in attributes:
        labels = sorted(
            {lab for m in per_model.values() for lab in m.get(attribute, {})}, key=label_order
        )
        lines = [
            f"**{attribute}** ({metric})\n",
            "| segment | users | " + " | ".join(models) + " |",
            "|---|---:|" + "---:|" * len(models),
        ]
        for label in labels:
            cells, users = [], 0
            for model in models:
                row = per_model[model].get(attribute, {}).get(label, {})
                users = max(users, row.get("users", 0))
                cells.append(f"{row[metric]:.4f}" if metric in row else "n/a")
            lines.append(f"| {label} | {users} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def format_paired(metrics: Mapping[str, Any], split: str) -> str:
    paired = metrics.get("paired", {}).get(split, {})
    if not paired:
        return ""
    lines = [
        "| model | vs baseline | metric | difference | 95% CI | p |",
        "|---|---|---|---:|---|---:|",
    ]
    for name, row in sorted(paired.items()):
        low, high = row["ci"]
        lines.append(
            f"| {name} | {row['baseline']} | {row['metric']} | {row['difference']:+.4f} | "
            f"[{low:+.4f}, {high:+.4f}] | {row['p_value']:.3g} |"
        )
    return "\n".join(lines) + "\n"


PROTOCOL_TEXT = (
    "Each protocol's test split is scored: strong/weak/temporal users are ranked from their "
    "fold-in history, cold users from their attributes alone. Every model is fitted on the "
    "train split of the protocol it is scored on (the CVAE and Mult-VAE: one model per "
    "protocol; cold users get the main protocol's). Metrics are means over users "
    "with held-out items, with 95% Poisson-bootstrap intervals over users; `missing` counts "
    "users a model returned nothing for (they score zero). Best value per column in bold "
    "(lowest for gini and popularity percentile). The paired test compares each model with "
    "the best baseline on the same bootstrap resamples of users."
)


def coinciding_notes(metrics: Mapping[str, Any], split: str) -> list[str]:
    """One sentence per group of models that rank identically on `split` (so a reader sees
    three equal rows as one fact, not three results)."""
    notes = []
    for first, rest in coinciding(metrics["splits"].get(split, {})).items():
        if rest:
            notes.append(f"{' and '.join([', '.join(rest), first])} give the same ranking on "
                         "this split (without a history, EASE and item-kNN fall back to "
                         "popularity).")
    return notes


def format_report(metrics: Mapping[str, Any]) -> str:
    """report.md: protocol paragraph, then per split the main table with CIs, the paired test
    and the per-segment tables."""
    parts = ["# Offline evaluation\n", PROTOCOL_TEXT + "\n"]
    protocol_of = {split: p for p, split in metrics.get("protocols", {}).items()}
    for split, counts in metrics.get("users", {}).items():
        protocol = protocol_of.get(split, "")
        parts.append(
            f"## {split}" + (f" ({protocol} protocol)" if protocol else "") + "\n\n"
            f"{counts['evaluated']} users evaluated, "
            f"{counts['without_targets']} without held-out items skipped.\n"
        )
        parts.append(format_table(metrics, split, with_ci=True))
        parts.extend(f"_{note}_\n" for note in coinciding_notes(metrics, split))
        paired = format_paired(metrics, split)
        if paired:
            parts.append("### Paired test against the best baseline\n\n" + paired)
        segments = format_segments(metrics, split)
        if segments:
            parts.append("### Per segment\n\n" + segments)
    labels = metrics.get("models", {})
    if labels:
        parts.append("## Models\n")
        parts.extend(f"- {name}: `{label}`" for name, label in sorted(labels.items()))
        parts.append("")
    return "\n".join(parts) + "\n"


# ---- HTML -----------------------------------------------------------------------------------


def _markdown_table_to_html(text: str) -> str:
    rows = [line.strip().strip("|").split("|") for line in text.strip().splitlines()]
    if len(rows) < 2:
        return f"<p>{html.escape(text)}</p>"
    head, body = rows[0], rows[2:]

    def cell(value: str, tag: str) -> str:
        value = value.strip()
        bold = value.startswith("**") and value.endswith("**")
        inner = html.escape(value.strip("*"))
        return f"<{tag}>{'<b>' + inner + '</b>' if bold else inner}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell(c, "th") for c in head) + "</tr>"]
    out += ["<tr>" + "".join(cell(c, "td") for c in row) + "</tr>" for row in body]
    return "\n".join(out + ["</table>"])


STYLE = """body{font-family:sans-serif;margin:24px;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}img{max-width:100%}
.whatif{display:flex;gap:16px;flex-wrap:wrap}.whatif div{border:1px solid #ddd;padding:8px}"""


def write_html(
    metrics: Mapping[str, Any], path: str, spec=None, export_dir: str = "", data_dir: str = "",
    training: Mapping[str, Any] | None = None,
) -> str:
    """report.html: the data and the training run, tables and plots per split, and the what-if
    panel when an export exists (`training`: `run_overview.training_section`'s record)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Offline evaluation</title>",
        f"<style>{STYLE}</style></head><body><h1>Offline evaluation</h1>",
        f"<p>{html.escape(PROTOCOL_TEXT)}</p>",
    ]
    if spec is not None:
        parts.append(dataset_section(spec))
    parts.append(training_section(training))
    protocol_of = {split: p for p, split in metrics.get("protocols", {}).items()}
    for split, counts in metrics.get("users", {}).items():
        if not metrics["splits"].get(split):
            continue
        title = split + (f" ({protocol_of[split]} protocol)" if split in protocol_of else "")
        parts.append(
            f"<h2>{html.escape(title)}</h2><p>{counts['evaluated']} users evaluated, "
            f"{counts['without_targets']} without held-out items skipped.</p>"
        )
        parts.append(_markdown_table_to_html(format_table(metrics, split, with_ci=True)))
        for note in coinciding_notes(metrics, split):
            parts.append(f"<p><i>{html.escape(note)} The figures draw them once.</i></p>")
        paired = format_paired(metrics, split)
        if paired:
            parts.append("<h3>Paired test against the best baseline</h3>")
            parts.append(_markdown_table_to_html(paired))
        parts.append(image_tag("metric@K curves", curves_figure(metrics, split)))
        parts.append(image_tag("coverage, popularity bias", tradeoff_figure(metrics, split)))
        figure = segments_figure(metrics, split)
        if figure is not None:
            parts.append("<h3>Per segment</h3>" + image_tag("per-segment accuracy", figure))
    if spec is not None and export_dir:
        panel = what_if_panel(spec, export_dir, data_dir)
        if panel:
            parts.append(panel)
    parts.append("</body></html>")
    text = "\n".join(parts)
    S.write_text(path, text)
    return text
