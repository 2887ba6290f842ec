"""What-if: how the CVAE's `generate` top-10 changes when one user attribute changes.

Why it is in the report: the conditional model's selling point is that attributes steer the
recommendations (cold start, personas). Showing the top-10 for a typical user and for the same
user with one attribute switched lets a reader see whether the attributes matter at all.

The panel calls the exported SavedModel's `generate` signature (tf.saved_model.load), the same
graph TF Serving runs; it never imports `recsys_cvae.model.cvae`.
"""

from __future__ import annotations

import html
from typing import Any

from recsys_cvae import spec as S
from recsys_cvae.datasets import layouts as L
from recsys_cvae.export_layout import newest_export


def what_if(
    spec: S.FeatureSpec, export_dir: str, attribute: str | None = None, variants: int = 4,
    top_n: int = 10,
) -> dict[str, Any] | None:
    """Top-n of `generate` for a typical user (most frequent value of every categorical
    attribute, mean of every numeric one) and for `variants` values of one categorical
    attribute (default: the one with the most values).

    Returns {"attribute", "base": {attr: value}, "rows": [{"value", "item_ids", "scores"}]}
    or None when there is no export or no categorical attribute.
    """
    import numpy as np
    import tensorflow as tf

    version_dir = newest_export(export_dir) if export_dir else None
    categorical = [a for a in spec.attributes if a.is_categorical and a.vocabulary_size > 1]
    if version_dir is None or not categorical:
        return None
    if attribute is None:
        attribute = max(categorical, key=lambda a: a.vocabulary_size).name
    base: dict[str, Any] = {}
    for a in spec.attributes:
        # a numeric attribute at its mean, rounded as a person would type it (45, not 45.3)
        base[a.name] = (spec.attribute_vocabulary(a.name)[0] if a.is_categorical
                        else float(f"{a.mean:.2g}"))
    values = spec.attribute_vocabulary(attribute)[:variants]
    generate = tf.saved_model.load(version_dir).signatures["generate"]
    columns = {
        a.name: values if a.name == attribute else [base[a.name]] * len(values)
        for a in spec.attributes
    }
    # The signature takes raw profile columns (`zip_code`, not `zip_region`); an attribute's
    # value stands for its column, since derivations are projections.
    raw = S.inputs_from_attributes(spec, columns)
    inputs = {
        i.name: tf.constant(raw[i.name] if i.is_categorical
                            else np.asarray(raw[i.name], dtype=np.float32))
        for i in S.serving_inputs(spec)
    }
    outputs = generate(**inputs)
    item_ids = outputs["item_ids"].numpy()[:, :top_n]
    scores = outputs["scores"].numpy()[:, :top_n]
    rows = [
        {"value": v, "item_ids": [i.decode() for i in ids], "scores": s.tolist()}
        for v, ids, s in zip(values, item_ids, scores)
    ]
    return {"attribute": attribute, "base": base, "export": version_dir, "rows": rows}


def what_if_panel(spec: S.FeatureSpec, export_dir: str, data_dir: str = "") -> str:
    """The HTML panel: one column per attribute value, items not in the first column's list
    in bold, and the overlap with it. Item titles come from item metadata when available."""
    result = what_if(spec, export_dir)
    if result is None:
        return ""
    titles: dict[str, str] = {}
    if data_dir:
        try:
            metadata = L.read_items(L.detect_layout(data_dir))
            titles = {i: row.get("title", "") for i, row in metadata.items()}
        except Exception:  # metadata is decoration; ids are shown without it
            titles = {}
    attribute, rows = result["attribute"], result["rows"]
    reference = set(rows[0]["item_ids"])
    others = ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result["base"].items() if k != attribute
    )
    parts = [
        "<h2>What if: generate top-10 when one attribute changes</h2>",
        f"<p>CVAE export <code>{html.escape(result['export'])}</code>, signature "
        f"<code>generate</code>; fixed attributes: {html.escape(others)}. "
        f"Varying <b>{html.escape(attribute)}</b>. Bold: not in the first column's list.</p>",
        "<div class='whatif'>",
    ]
    for row in rows:
        overlap = len(reference & set(row["item_ids"]))
        items = []
        for item in row["item_ids"]:
            label = html.escape(f"{item} {titles.get(item, '')}".strip())
            items.append(f"<li>{label if item in reference else '<b>' + label + '</b>'}</li>")
        parts.append(
            f"<div><h4>{html.escape(attribute)} = {html.escape(str(row['value']))}</h4>"
            f"<p>overlap with first: {overlap}/{len(row['item_ids'])}</p>"
            f"<ol>{''.join(items)}</ol></div>"
        )
    parts.append("</div>")
    return "\n".join(parts)
