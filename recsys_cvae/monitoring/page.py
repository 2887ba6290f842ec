"""`monitor.json` and `monitor.html`: the comparison as a file for machines and a page for
people (self-contained: inline style, no script, no external resource)."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from typing import Any

from recsys_cvae import html_page as page

JSON_FILE, HTML_FILE = "monitor.json", "monitor.html"

_STYLE = """
.pass { color: #176b2c; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
.banner { padding: .6em 1em; border-radius: 6px; margin: 1em 0; }
.banner.pass { background: #e6f4ea; } .banner.fail { background: #fce8e6; }
"""

FIGURES = (("users", "users"), ("recommendations", "recommendations"),
           ("mean_list_length", "mean list length"), ("distinct_items", "distinct items"),
           ("coverage", "coverage"), ("gini", "Gini of exposure"),
           ("popularity", "mean reference popularity"), ("long_tail", "long-tail share"))


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def failures(result: Mapping[str, Any]) -> list[str]:
    """One line per failed check: `item_jsd 0.31 > 0.10` (and where, for a segment)."""
    lines = []
    for check in result["checks"]:
        if not check["passed"]:
            opposite = ">" if check["relation"] == "≤" else "<"
            where = f" ({check['where']})" if check.get("where") else ""
            lines.append(f"{check['name']} {check['value']:.4g} {opposite} "
                         f"{check['limit']:.4g}{where}")
    return lines


def render(result: Mapping[str, Any]) -> str:
    ref, cur = result["reference"], result["current"]
    verdict = "pass" if result["passed"] else "fail"
    banner = ("Every check passed." if result["passed"] else
              "Failed: " + "; ".join(html.escape(line) for line in failures(result)))
    figures = [[label, _cell(ref[key]), _cell(cur[key])] for key, label in FIGURES]
    figures += [[f"top-1 score {key}", _cell(ref["top1_score"][key]),
                 _cell(cur["top1_score"][key])] for key in ("mean", "p5", "p50", "p95")]
    checks = [[html.escape(c["name"]), _cell(c["value"]),
               f"{html.escape(c['relation'])} {_cell(c['limit'])}",
               html.escape(c.get("where") or c.get("note", "")),
               f"<span class=\"{'pass' if c['passed'] else 'fail'}\">"
               f"{'pass' if c['passed'] else 'FAIL'}</span>"] for c in result["checks"]]
    segments = [[html.escape(s["attribute"]), html.escape(s["segment"]), s["reference_users"],
                 s["current_users"], s["reference_distinct_items"], s["current_distinct_items"],
                 _cell(s["jsd"])] for s in result["segments"]]
    segment_table = (
        "<h2>Exposure per attribute segment</h2>" + page.table(
            ["attribute", "segment", "users (ref.)", "users (cur.)", "distinct items (ref.)",
             "distinct items (cur.)", "JSD"], segments)
        if segments else "<p>No attributes in both sets: no segments.</p>")
    body = (
        "<h1>Output monitor: current against reference</h1>"
        f"<div class=\"banner {verdict}\">{banner}</div>"
        f"<p>Reference: <code>{html.escape(ref['source'])}</code> ({ref['kind']}); current: "
        f"<code>{html.escape(cur['source'])}</code> ({cur['kind']}); "
        f"{result['catalogue_items']} items recommended in either.</p>"
        "<h2>Checks</h2>" + page.table(["check", "value", "limit", "where", "verdict"], checks)
        + "<h2>Figures</h2>" + page.table(["", "reference", "current"], figures)
        + segment_table)
    return page.document("Output monitor", body, _STYLE)


def write(result: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    data, html_path = os.path.join(out_dir, JSON_FILE), os.path.join(out_dir, HTML_FILE)
    with open(data, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(html_path, "w") as f:
        f.write(render(result))
    return data, html_path
