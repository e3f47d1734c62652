"""The report as one HTML page: the Markdown sections' tables and text, then the plots."""

from __future__ import annotations

import html

from bts.report.plots import PLOTS
from bts.report.tables import html_table


def to_html(results, sections, plots) -> str:
    body = []
    for title, md in sections:
        body.append(f"<h2>{html.escape(title)}</h2>")
        table_lines = [line for line in md.splitlines() if line.startswith("|")]
        if table_lines:
            header = [c.strip() for c in table_lines[0].strip("|").split("|")]
            rows = [[c.strip() for c in line.strip("|").split("|")] for line in table_lines[2:]]
            body.append(html_table(header, rows))
        for line in md.splitlines():
            if line and not line.startswith("|"):
                body.append(f"<p>{html.escape(line)}</p>")
    for key, _ in PLOTS:
        if plots.get(key):
            body.append(f'<p><img src="{plots[key].name}" style="max-width:100%"></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}")
    title = f"bts report — {html.escape(results.get('recipe', ''))}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>" \
           f"<body><h1>{title}</h1>{''.join(body)}</body></html>\n"
