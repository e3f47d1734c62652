"""The run report: results tables (Markdown and HTML) and PNG plots, all drawn from files in the run directory.

Everything here reads results.json, stages/*.json, eval/gates.json, modularity/results.json, recipe.yaml (as plain
YAML), data/*/provenance.json and train/*/metrics.jsonl, so a report can be regenerated at any time
(`bts report RUN_DIR`) without touching a model: the pipeline (bts.pipeline.stages) writes what it needs.

    tables.py      held-out loss, parameters, gates per domain, training budget
    plots.py       training curves, held-out bars, the gate heatmap, modularity
    html.py        the HTML page
    modularity.py  the Modularity sections and the sentence under the gate table
    regime.py      budgets against the paper's, specialisation and forgetting, gates on the mixed-document sets
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from bts.atomic import atomic_write_text
from bts.report.html import to_html
from bts.report.modularity import gate_sentence, modularity_sections
from bts.report.plots import (PLOTS, plot_gate_heatmap, plot_heldout_bars, plot_modularity,
                              plot_training_curves)
from bts.report.regime import regime_sections
from bts.report.tables import (GATES_TITLE, _fmt_int, budget_rows, gate_markdown, html_table, markdown_table,
                               mixed_docs_note, params_table, results_table)

__all__ = ["write_report", "build_sections", "results_table", "params_table", "markdown_table", "html_table",
           "gate_markdown", "gate_sentence", "modularity_sections", "budget_rows", "to_html", "GATES_TITLE", "PLOTS",
           "plot_training_curves", "plot_heldout_bars", "plot_gate_heatmap", "plot_modularity"]


def write_report(run_dir, stage_order=None) -> Path:
    """Write report/report.md, report/report.html and the plots for a finished run directory (a path, or
    anything with a .root, such as a bts.pipeline.run.Run). stage_order: stage marker names (stages/<name>.json)
    in pipeline order for the stages table (the pipeline passes it; others sort by name, after those listed)."""
    root = Path(run_dir if isinstance(run_dir, (str, os.PathLike)) else run_dir.root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((root / "results.json").read_text())
    plots = {"curves": plot_training_curves(root, out / "training_loss.png"),
             "bars": plot_heldout_bars(results, out / "heldout_loss.png")}
    modularity_file = root / "modularity" / "results.json"
    # Results of a modularity stage that the recipe no longer enables are not this recipe's: leave them out.
    recipe = yaml.safe_load((root / "recipe.yaml").read_text()) if (root / "recipe.yaml").exists() else {}
    enabled = bool(((recipe or {}).get("modularity") or {}).get("enabled", False))
    modularity = json.loads(modularity_file.read_text()) if enabled and modularity_file.exists() else None
    gates = modularity["gates"] if modularity else None
    gates_file = root / "eval" / "gates.json"  # written by the evaluate stage
    measured = None
    if "bts" in results["methods"] and gates_file.exists():
        measured = json.loads(gates_file.read_text())
        plots["gates"] = plot_gate_heatmap(measured["heatmap"], out / "gates.png")
        if measured.get("mixed_docs_heatmap"):  # one natural mixed document (bts.pipeline.mixed)
            plots["gates_docs"] = plot_gate_heatmap(measured["mixed_docs_heatmap"], out / "gates_mixed_docs.png",
                                                    what="license header / comment / docstring / code", suffix="")
        if gates is None:  # the modularity stage measured the same table; otherwise the evaluate stage's
            gates = measured["per_domain"]
    provenance = {d: json.loads((root / "data" / d / "provenance.json").read_text())
                  for d in results["domains"] if (root / "data" / d / "provenance.json").exists()}
    order = {name: i for i, name in enumerate(stage_order or ())}
    markers = sorted((root / "stages").glob("*.json"), key=lambda p: (order.get(p.stem, len(order)), p.stem))
    stages = {p.stem: json.loads(p.read_text()) for p in markers}
    sections = build_sections(results, provenance, stages)
    extra = []
    if gates:
        extra.append((GATES_TITLE, gate_markdown(gates) + ("\n\n" + gate_sentence(gates) if modularity else "")))
    if modularity:
        extra = modularity_sections(modularity, gates_section=extra)
        plots["modularity"] = plot_modularity(modularity, out / "modularity.png")
    sections[2:2] = extra
    regime, regime_plots = regime_sections(root, results, stages, recipe, measured, out)  # bts.report.regime
    sections[-1:-1] = regime  # before the stages table
    plots.update(regime_plots)
    md = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections)
    md = f"# bts report — {results.get('recipe', '')}\n\n{md}\n"
    for key, label in PLOTS:
        if plots.get(key):
            md += f"\n![{label}]({plots[key].name})\n"
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", to_html(results, sections, plots))
    return out / "report.md"


def build_sections(results, provenance, stages) -> list[tuple[str, str]]:
    caveat = ""
    if results.get("recipe") == "smoke":
        caveat = ("\n\n**Smoke preset: a plumbing check on ~100 KB fixtures with a few dozen steps; its numbers are "
                  "not meaningful. Run `bts demo` for the real comparison.**")
    sections = [("Held-out loss (nats/token; lower is better; best per column in bold)",
                 markdown_table(*results_table(results)) +
                 "\n\n`mixed` is held-out text that switches domain every half window." + mixed_docs_note(results)
                 + caveat)]
    sections.append(("Parameters and training cost", markdown_table(*params_table(results))))
    if "downstream" in results:
        from bts.eval.downstream.scoring import markdown_table as downstream_table

        sections.append(("Downstream tasks (accuracy ↑; nll = answer negative log-likelihood per token ↓)",
                         downstream_table(results["downstream"])))
    if provenance:
        rows = [[d, p.get("source", "–"), p.get("license", "–"), str(p.get("documents", "–"))]
                for d, p in provenance.items()]
        sections.append(("Data", markdown_table(["domain", "source", "license", "documents"], rows)))
    sections.append(("Training budget (every trained method: data, steps, tokens)", markdown_table(
        ["method", "data", "steps", "batch × seq", "peak lr", "tokens"], budget_rows(results, stages))))
    rows = [[s, f"{info.get('wall_s', 0):.0f}", _fmt_int(info.get("tokens")), f"{info['final_loss']:.3f}"
             if "final_loss" in info else "–"] for s, info in stages.items()]
    sections.append(("Stages (wall time per stage, in pipeline order)",
                     markdown_table(["stage", "wall (s)", "train tokens", "final train loss"], rows)))
    return sections
