"""Self-contained HTML pages (inline style, no script, no external resource): the frame and
tables the model card, the monitor page and the synthesis report share.

Why at the bottom: those three live in roles that may not import each other (export,
monitoring, synthesis); each formats its own cells and passes them in as HTML.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; border-bottom: 2px solid #345; padding-bottom: .3em; }
h2 { font-size: 1.15em; margin-top: 1.6em; color: #345; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ccd; padding: 4px 8px; text-align: left; }
th { background: #eef2f6; }
tr:nth-child(even) td { background: #fafbfc; }
code { background: #f2f2f2; padding: 0 3px; border-radius: 3px; }
"""


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table of plain-text headers and cells that are already HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def document(title: str, body: str, extra_style: str = "") -> str:
    """The whole page around `body` (HTML)."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}{extra_style}</style></head>"
            f"<body>\n{body}\n</body></html>\n")
