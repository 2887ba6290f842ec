"""`monitor.json` and `monitor.html`: the comparison as a file for machines and a page for
people (self-contained: inline style, no script, no external resource)."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from typing import Any

JSON_FILE, HTML_FILE = "monitor.json", "monitor.html"

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; color: #345; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ccd; padding: 4px 8px; text-align: left; }
th { background: #eef2f6; }
.pass { color: #176b2c; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
.banner { padding: .6em 1em; border-radius: 6px; margin: 1em 0; }
.banner.pass { background: #e6f4ea; } .banner.fail { background: #fce8e6; }
code { background: #f2f2f2; padding: 0 3px; }
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
    rows = "".join(f"<tr><td>{label}</td><td>{_cell(ref[key])}</td><td>{_cell(cur[key])}</td>"
                   "</tr>" for key, label in FIGURES)
    for key in ("mean", "p5", "p50", "p95"):
        rows += (f"<tr><td>top-1 score {key}</td><td>{_cell(ref['top1_score'][key])}</td>"
                 f"<td>{_cell(cur['top1_score'][key])}</td></tr>")
    checks = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{_cell(c['value'])}</td>"
        f"<td>{html.escape(c['relation'])} {_cell(c['limit'])}</td>"
        f"<td>{html.escape(c.get('where') or c.get('note', ''))}</td>"
        f"<td class=\"{'pass' if c['passed'] else 'fail'}\">"
        f"{'pass' if c['passed'] else 'FAIL'}</td></tr>" for c in result["checks"])
    segments = "".join(
        f"<tr><td>{html.escape(s['attribute'])}</td><td>{html.escape(s['segment'])}</td>"
        f"<td>{s['reference_users']}</td><td>{s['current_users']}</td>"
        f"<td>{s['reference_distinct_items']}</td><td>{s['current_distinct_items']}</td>"
        f"<td>{_cell(s['jsd'])}</td></tr>" for s in result["segments"])
    segment_table = (
        "<h2>Exposure per attribute segment</h2><table><tr><th>attribute</th><th>segment</th>"
        "<th>users (ref.)</th><th>users (cur.)</th><th>distinct items (ref.)</th>"
        f"<th>distinct items (cur.)</th><th>JSD</th></tr>{segments}</table>"
        if segments else "<p>No attributes in both sets: no segments.</p>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Output monitor</title><style>{_STYLE}</style></head><body>"
        "<h1>Output monitor: current against reference</h1>"
        f"<div class=\"banner {verdict}\">{banner}</div>"
        f"<p>Reference: <code>{html.escape(ref['source'])}</code> ({ref['kind']}); current: "
        f"<code>{html.escape(cur['source'])}</code> ({cur['kind']}); "
        f"{result['catalogue_items']} items recommended in either.</p>"
        "<h2>Checks</h2><table><tr><th>check</th><th>value</th><th>limit</th><th>where</th>"
        f"<th>verdict</th></tr>{checks}</table>"
        "<h2>Figures</h2><table><tr><th></th><th>reference</th><th>current</th></tr>"
        f"{rows}</table>{segment_table}</body></html>\n")


def write(result: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    data, page = os.path.join(out_dir, JSON_FILE), os.path.join(out_dir, HTML_FILE)
    with open(data, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(page, "w") as f:
        f.write(render(result))
    return data, page
