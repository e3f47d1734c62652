"""A study's numbers over seeds (bts.pipeline.study, docs/paper.md): mean ± spread per method, ties, and the report.

    s = stats([3.41, 3.43, 3.40])   # {"mean": 3.4133…, "spread": 0.015, "n": 3, "values": [...]}
    tie(a, b)                       # |mean_a − mean_b| ≤ max(spread_a, spread_b)

The spread is half the range, (max − min) / 2, over the seeds: with three seeds a sample standard deviation is a
poor estimate, while half the range is what the seeds did (mean ± spread covers every seed when the mean sits
mid-range). Two methods tie when their means differ by no more than the larger of their two spreads. A number
measured once (a merge or BTM, which no seed changes: seed-0's run only) has spread 0.
"""

from __future__ import annotations

import math
from pathlib import Path

from bts.report.tables import markdown_table


def stats(values) -> dict:
    """Mean and spread (half the range) of a list of numbers (NaN/None dropped)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": math.nan, "spread": math.nan, "n": 0, "values": []}
    return {"mean": math.fsum(vals) / len(vals), "spread": (max(vals) - min(vals)) / 2, "n": len(vals),
            "values": vals}


def tie(a: dict, b: dict) -> bool:
    """Whether two stats cannot be told apart: |Δmean| ≤ the larger spread of the two."""
    return abs(a["mean"] - b["mean"]) <= max(a["spread"], b["spread"])


def ranked(table: dict, higher_is_better: bool = False) -> list[tuple[int, str, dict, list[str]]]:
    """(rank, name, stats, names it ties with) in order of mean (best first); rank 1 is the best mean."""
    order = sorted((n for n in table if table[n]["n"]), key=lambda n: table[n]["mean"], reverse=higher_is_better)
    return [(i + 1, n, table[n], [m for m in order if m != n and tie(table[n], table[m])])
            for i, n in enumerate(order)]


def fmt(s: dict, digits: int = 4) -> str:
    if not s.get("n"):
        return "–"
    text = f"{s['mean']:.{digits}f} ± {s['spread']:.{digits}f}"
    return text if s["n"] > 1 else f"{s['mean']:.{digits}f} (1 run)"


# ---- aggregation of sub-runs' results.json -------------------------------------------------------------------
def aggregate_methods(results: list[dict]) -> dict:
    """Per method, over the runs that scored it: the domain-average held-out loss, each domain's and each
    mixed-document set's, as stats."""
    names = list(dict.fromkeys(m for r in results for m in r.get("methods", {})))
    out = {}
    for m in names:
        entries = [r["methods"][m] for r in results if m in r.get("methods", {})]
        domains = list(dict.fromkeys(d for e in entries for d in e.get("heldout_loss", {})))
        mixed = list(dict.fromkeys(k for e in entries for k in (e.get("mixed_docs_loss") or {})))
        out[m] = {"avg": stats(e.get("avg_heldout_loss") for e in entries),
                  "domains": {d: stats(e["heldout_loss"].get(d) for e in entries) for d in domains},
                  "mixed": {k: stats((e.get("mixed_docs_loss") or {}).get(k) for e in entries) for k in mixed}}
    return out


def aggregate_downstream(results: list[dict]) -> dict:
    """Per task: its metric and direction, and per method the score's stats over the runs that scored it."""
    sections = [r["downstream"] for r in results if r.get("downstream")]
    tasks: dict = {}
    for s in sections:
        for task, spec in s.get("tasks", {}).items():
            tasks.setdefault(task, {**spec, "methods": {}})
    for task, entry in tasks.items():
        names = list(dict.fromkeys(m for s in sections for m in s.get("scores", {}) if task in s["scores"][m]))
        entry["methods"] = {m: stats(s["scores"][m][task] for s in sections if task in s.get("scores", {}).get(m, {}))
                            for m in names}
    return tasks


# ---- the report -----------------------------------------------------------------------------------------------
def _vs(a: dict, ref: dict | None) -> str:
    if ref is None or not a["n"] or not ref["n"]:
        return "–"
    if tie(a, ref):
        return "tie"
    return "better (lower)" if a["mean"] < ref["mean"] else "worse (higher)"


def methods_markdown(methods: dict) -> str:
    rows = []
    domains = list(dict.fromkeys(d for m in methods.values() for d in m["domains"]))
    mixed = list(dict.fromkeys(k for m in methods.values() for k in m["mixed"]))
    table = {m: v["avg"] for m, v in methods.items()}
    for rank, name, s, ties in ranked(table):
        v = methods[name]
        rows.append([rank, name, fmt(s), s["n"], ", ".join(ties) or "–",
                     *(fmt(v["domains"].get(d, {})) for d in domains), *(fmt(v["mixed"].get(k, {})) for k in mixed)])
    header = ["rank", "method", "avg held-out loss", "runs", "ties with", *domains, *(f"mixed: {k}" for k in mixed)]
    return markdown_table(header, rows)


def downstream_markdown(tasks: dict) -> str:
    parts = []
    for task, entry in tasks.items():
        better = "higher" if entry.get("higher_is_better", True) else "lower"
        rows = [[rank, name, fmt(s, 3), s["n"], ", ".join(ties) or "–"]
                for rank, name, s, ties in ranked(entry["methods"], entry.get("higher_is_better", True))]
        parts.append(f"**{task}** ({entry.get('metric', '?')}, {better} is better, n = {entry.get('n', '?')})\n\n"
                     + markdown_table(["rank", "method", "score", "runs", "ties with"], rows))
    return "\n\n".join(parts)


def variants_markdown(variants: dict, paper: dict | None) -> str:
    header = ["configuration", "overrides", "avg held-out loss", "runs", "vs the paper's (bts)"]
    rows = [["**bts** (the paper's)", "–", fmt(paper) if paper else "–", paper["n"] if paper else 0, "–"]]
    for name, v in variants.items():
        if v.get("error"):
            rows.append([name, v["overrides_text"], "not run: " + v["error"], 0, "–"])
        else:
            rows.append([name, v["overrides_text"], fmt(v["avg"]), v["avg"]["n"], _vs(v["avg"], paper)])
    return markdown_table(header, rows)


def curve_markdown(curve: list[dict], paper: dict | None) -> str:
    rows = [[p["steps"], "–" if p.get("tokens") is None else f"{p['tokens']:,}",
             "not run: " + p["error"] if p.get("error") else fmt(p["avg"]),
             "–" if p.get("error") else p["avg"]["n"],
             "–" if p.get("error") or p.get("base") else _vs(p["avg"], paper)] for p in curve]
    return markdown_table(["stitch steps", "stitch tokens", "avg held-out loss", "runs", "vs the paper's"], rows)


def plot_curve(curve: list[dict], out: Path) -> Path | None:
    """x: stitch tokens, y: avg held-out loss, mean ± spread as error bars."""
    points = [p for p in curve if not p.get("error") and p["avg"]["n"] and p.get("tokens")]
    if not points:
        return None
    from bts.report.plots import plt

    points.sort(key=lambda p: p["tokens"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar([p["tokens"] for p in points], [p["avg"]["mean"] for p in points],
                yerr=[p["avg"]["spread"] for p in points], marker="o", capsize=4, label="bts (mean ± spread)")
    ax.set_xscale("log")
    ax.set_xlabel("stitch training tokens")
    ax.set_ylabel("avg held-out loss (nats/token)")
    ax.set_title("Stitch budget curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_methods(methods: dict, out: Path) -> Path | None:
    rows = ranked({m: v["avg"] for m, v in methods.items()})
    if not rows:
        return None
    from bts.report.plots import plt

    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(rows) + 1.2))
    names = [r[1] for r in rows][::-1]
    ax.barh(names, [methods[n]["avg"]["mean"] for n in names], xerr=[methods[n]["avg"]["spread"] for n in names],
            capsize=3, color=["tab:red" if n == "bts" else "tab:blue" for n in names])
    low = min(methods[n]["avg"]["mean"] - methods[n]["avg"]["spread"] for n in names)
    ax.set_xlim(left=max(0.0, low - 0.1))
    ax.set_xlabel("avg held-out loss (nats/token), mean ± spread over seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_study_report(study: dict, out_dir: Path) -> Path:
    """DIR/report/report.md (+ methods.png, curve.png) from study.json's content."""
    from bts.atomic import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    paper = study["methods"].get("bts", {}).get("avg")
    seeds = ", ".join(map(str, study["seeds"]))
    intro = ("Held-out loss in nats/token, mean ± spread over seeds; spread = half the range (max − min) / 2. Two "
             "numbers tie when |Δmean| ≤ the larger of their spreads. The merges and BTM do not depend on the seed "
             "(no training): their numbers are seed-0's run alone (1 run). The seed and the experts are the same "
             "models in every run (trained once, in seed-0).")
    parts = [f"# Study: {study['name']} (base recipe: {study['base']}, seeds {seeds})", intro,
             "## Methods (ranked by mean)", methods_markdown(study["methods"])]
    if plot_methods(study["methods"], out_dir / "methods.png"):
        parts.append("![methods](methods.png)")
    if study.get("downstream"):
        parts += ["## Downstream tasks", downstream_markdown(study["downstream"])]
    if study.get("variants"):
        parts += ["## Stitching variants (given members, no baselines)", variants_markdown(study["variants"], paper)]
    if study.get("curve"):
        parts += ["## Stitch budget curve", curve_markdown(study["curve"], paper)]
        if plot_curve(study["curve"], out_dir / "curve.png"):
            parts.append("![curve](curve.png)")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n\n".join(parts) + "\n")
    return path
