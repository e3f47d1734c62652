"""The report's tables: held-out loss, parameters, gates per domain, training budget (Markdown and HTML)."""

from __future__ import annotations

import html


def _fmt_int(n) -> str:
    if n is None:
        return "–"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def results_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Rows = methods, columns = held-out loss per domain + average + mixed (the switching text) + one per natural
    mixed-document set (results["mixed_docs"]); best (lowest) per column in bold."""
    domains = results["domains"]
    sets = list(results.get("mixed_docs") or {})
    cols = [*domains, "avg", "mixed", *sets]
    methods = results["methods"]
    values = {m: [e["heldout_loss"][d] for d in domains] + [e["avg_heldout_loss"], e.get("mixed_heldout_loss")]
              + [(e.get("mixed_docs_loss") or {}).get(s) for s in sets] for m, e in methods.items()}
    best = [min((v[i] for v in values.values() if v[i] is not None), default=None) for i in range(len(cols))]
    rows = []
    for m, vals in values.items():
        cells = []
        for i, v in enumerate(vals):
            text = "–" if v is None else f"{v:.3f}"
            cells.append(f"**{text}**" if v is not None and v == best[i] else text)
        rows.append([m, *cells])
    return ["method", *cols], rows


def mixed_docs_note(results: dict) -> str:
    """The sentence under the loss table naming the natural mixed-document sets, their sources and sizes."""
    sets = results.get("mixed_docs") or {}
    if not sets:
        return ""
    parts = [f"`{name}` ({info.get('source', '?').split(' (')[0].split(',')[0]} {info.get('version', '')}, "
             f"{info.get('license', '?')}; {info.get('documents', '?')} documents, {info.get('tokens_scored', '?')} "
             f"tokens scored)" for name, info in sets.items()]
    return (" The natural mixed-document sets, held out from every training split (docs/mixed.md), are "
            + "; ".join(parts) + ".")


def params_table(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", "trainable", "total", "active", "train tokens", "train wall (s)"]
    rows = []
    for m, e in results["methods"].items():
        wall = e.get("train_wall_s")
        rows.append([m, _fmt_int(e.get("trainable_params")), _fmt_int(e.get("total_params")),
                     _fmt_int(e.get("active_params")), _fmt_int(e.get("train_tokens")),
                     "–" if wall is None else f"{wall:.0f}"])
    return header, rows


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def html_table(header, rows) -> str:
    def cell(c):
        c = str(c)
        return f"<b>{html.escape(c[2:-2])}</b>" if c.startswith("**") else html.escape(c)

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


GATES_TITLE = ("Who feeds the hub, per domain (mean mixing weight at each E→H stitch on held-out text; "
               "the matching expert should lead among the experts)")


def gate_markdown(table: dict) -> str:
    """Rows = (domain, stitch), columns = members; the largest expert weight of each row in bold."""
    first = next(iter(table.values()))
    members = list(next(iter(first.values())))
    rows = []
    for domain, layers in table.items():
        for layer, weights in layers.items():
            top = max(members[1:], key=lambda m: weights[m])
            rows.append([f"{domain} ({layer})"] + [f"**{weights[m]:.3f}**" if m == top else f"{weights[m]:.3f}"
                                                  for m in members])
    return markdown_table(["held-out text (stitch)", *members], rows)


def _marker(method: str) -> str:
    """The stage marker (stages/<this>.json) of an evaluated method."""
    if method == "seed":
        return "seed"
    if method == "bts":
        return "stitch"
    return method.replace(":", "-") if method.startswith("expert:") else f"baseline-{method}"


def budget_rows(results: dict, stages: dict) -> list[list[str]]:
    """One row per evaluated method whose stage marker records a training budget, in results order (seed,
    experts, bts, baselines)."""
    rows = []
    for name in results["methods"]:
        info = stages.get(_marker(name), {})
        b = info.get("budget")
        if b is None:
            continue
        data = b["data"] if isinstance(b["data"], str) else ", ".join(f"{d} {w:.0%}" for d, w in b["data"].items())
        rows.append([name, data, str(b["steps"]), f"{b['batch_size']} × {b['seq_len']}", f"{b['lr']:g}",
                     _fmt_int(info.get("tokens"))])
    return rows
