"""The run report: results tables (Markdown and HTML) and PNG plots, all drawn from files in the run directory.

Everything here reads results.json, stages/*.json, data/*/provenance.json and train/*/metrics.jsonl, so a report
can be regenerated at any time (`bts report RUN_DIR`) without touching a model, except the gate heatmap, which
runs the stitched model once on a held-out text that switches domain part-way.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bts.atomic import atomic_write_text  # noqa: E402


def _fmt_int(n) -> str:
    if n is None:
        return "–"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def results_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Rows = methods, columns = held-out loss per domain + average + mixed; best (lowest) per column in bold."""
    domains = results["domains"]
    cols = [*domains, "avg", "mixed"]
    methods = results["methods"]
    values = {m: [e["heldout_loss"][d] for d in domains] + [e["avg_heldout_loss"], e.get("mixed_heldout_loss")]
              for m, e in methods.items()}
    best = [min((v[i] for v in values.values() if v[i] is not None), default=None) for i in range(len(cols))]
    rows = []
    for m, vals in values.items():
        cells = []
        for i, v in enumerate(vals):
            text = "–" if v is None else f"{v:.3f}"
            cells.append(f"**{text}**" if v is not None and v == best[i] else text)
        rows.append([m, *cells])
    return ["method", *cols], rows


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


# ---- plots -------------------------------------------------------------------------------------------------
def plot_training_curves(root: Path, out: Path) -> Path | None:
    # Language-model losses only: the routing baseline logs its router's classification loss, another quantity.
    files = [f for f in sorted((root / "train").glob("*/metrics.jsonl")) if f.parent.name != "routing"]
    if not files:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for f in files:
        recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if recs:
            ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=f.parent.name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss per stage (language-model loss; the router's own loss is in train/routing)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_heldout_bars(results: dict, out: Path) -> Path:
    domains = [*results["domains"], "mixed"]
    methods = list(results["methods"])
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(methods)
    colours = plt.get_cmap("tab20").colors  # one distinct colour per method (the default cycle repeats after 10)
    for i, m in enumerate(methods):
        e = results["methods"][m]
        vals = [e["heldout_loss"][d] for d in results["domains"]] + [e.get("mixed_heldout_loss") or 0]
        ax.bar([j + i * width for j in range(len(domains))], vals, width, label=m, color=colours[i % 20])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax.set_ylabel("held-out loss (nats/token, lower is better)")
    lo = min(min(e["heldout_loss"].values()) for e in results["methods"].values())
    ax.set_ylim(bottom=max(0, lo - 0.5))
    ax.legend(fontsize=7, ncol=5, loc="upper left")
    ax.set_title("Held-out loss per domain and method")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@torch.no_grad()
def plot_gate_heatmap(model, tokenizer, ids: torch.Tensor, boundaries: list[int], out: Path) -> Path:
    """Per-token mixing weight of each member at the last E→H stitch (averaged over channels; the blend gate is
    folded in, so a column sums to 1): tokens × members."""
    gates = model.gate_values(ids.view(1, -1), effective=True)
    last = max(i for i, s in enumerate(model.stitches) if s.kind == "e2h")
    mass = gates[last][0].mean(-1).T.numpy()  # [members, T]
    names = ["hub"] + list(model.config.expert_names)
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.45 * len(names)))
    im = ax.imshow(mass, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.5, float(mass.max())))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("token position (dashed lines: domain switches)")
    for b, label in boundaries:
        ax.axvline(b - 0.5, color="white", linestyle="--", linewidth=1)
        ax.text(b + 1, len(names) - 0.6, f"{label} text", fontsize=8, color="white", va="bottom")
    fig.colorbar(im, ax=ax, label="mixing weight")
    ax.set_title(f"Who feeds the hub: last E→H stitch (after block {model.config.stitch_positions[last]}), per token",
                 pad=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(run) -> Path:
    """Write report/report.md, report/report.html and the plots for a finished run."""
    root = run.root
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((root / "results.json").read_text())
    plots = {"curves": plot_training_curves(root, out / "training_loss.png"),
             "bars": plot_heldout_bars(results, out / "heldout_loss.png")}
    if "bts" in results["methods"]:
        from bts.pipeline import _load_bts

        model, _ = _load_bts(root / "models" / "bts")
        chunk = run.recipe.data.seq_len // 2
        pieces, bounds, pos = [], [], 0
        for d in run.domains[:4]:
            pieces.append(run.stream(d, "heldout")[:chunk])
            bounds.append((pos, d))
            pos += chunk
        plots["gates"] = plot_gate_heatmap(model, run.tokenizer(), torch.cat(pieces), bounds, out / "gates.png")
        from bts.data import eval_windows
        from bts.modularity import gate_table

        windows = {d: eval_windows(run.stream(d, "heldout"), run.recipe.data.seq_len, 8 * run.recipe.data.seq_len)
                   for d in run.domains}
        gates = gate_table(model, windows)
    provenance = {d: json.loads((root / "data" / d / "provenance.json").read_text())
                  for d in results["domains"] if (root / "data" / d / "provenance.json").exists()}
    stages = {p.stem: json.loads(p.read_text())
              for p in sorted((root / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime)}
    sections = build_sections(run, results, provenance, stages)
    if "bts" in results["methods"]:
        sections.insert(2, ("Who feeds the hub, per domain (mean mixing weight at each E→H stitch on held-out text; "
                            "the matching expert should lead among the experts)", gate_markdown(gates)))
    md = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections)
    md = f"# bts report — {results.get('recipe', '')}\n\n{md}\n"
    for key, label in (("curves", "Training loss"), ("bars", "Held-out loss"), ("gates", "Gates")):
        if plots.get(key):
            md += f"\n![{label}]({plots[key].name})\n"
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", to_html(results, sections, plots))
    return out / "report.md"


def build_sections(run, results, provenance, stages) -> list[tuple[str, str]]:
    caveat = ""
    if results.get("recipe") == "smoke":
        caveat = ("\n\n**Smoke preset: a plumbing check on ~100 KB fixtures with a few dozen steps; its numbers are "
                  "not meaningful. Run `bts demo` for the real comparison.**")
    sections = [("Held-out loss (nats/token; lower is better; best per column in bold)",
                 markdown_table(*results_table(results)) +
                 "\n\n`mixed` is held-out text that switches domain every half window." + caveat)]
    sections.append(("Parameters and training cost", markdown_table(*params_table(results))))
    if "downstream" in results:
        from bts.downstream.scoring import markdown_table as downstream_table

        sections.append(("Downstream tasks (accuracy ↑; nll = answer negative log-likelihood per token ↓)",
                         downstream_table(results["downstream"])))
    if provenance:
        rows = [[d, p.get("source", "–"), p.get("license", "–"), str(p.get("documents", "–"))]
                for d, p in provenance.items()]
        sections.append(("Data", markdown_table(["domain", "source", "license", "documents"], rows)))
    sections.append(("Training budget (every trained method: data, steps, tokens)", markdown_table(
        ["method", "data", "steps", "batch × seq", "peak lr", "tokens"], budget_rows(run, results, stages))))
    rows = [[s, f"{info.get('wall_s', 0):.0f}", _fmt_int(info.get("tokens")), f"{info['final_loss']:.3f}"
             if "final_loss" in info else "–"] for s, info in stages.items()]
    sections.append(("Stages (wall time per stage, in the order they ran)",
                     markdown_table(["stage", "wall (s)", "train tokens", "final train loss"], rows)))
    return sections


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


def budget_rows(run, results, stages) -> list[list[str]]:
    r = run.recipe
    mix = ", ".join(f"{d} {w:.0%}" for d, w in run.stitch_mix().items())
    seq = r.data.seq_len
    phases = [("seed", "seed", "all domains equally", r.seed_model.train)]
    phases += [(f"expert:{d}", f"expert:{d}", d, r.experts.train) for d in r.expert_domains]
    phases += [("bts", "stitch", mix, r.stitch.train)]
    for m in r.baselines.methods:
        if m.startswith("btx_"):
            phases.append((m, f"baseline:{m}", mix, r.stitch.train, r.baselines.btx_lr))
        elif m == "routing":
            phases.append((m, "baseline:routing", mix, r.stitch.train, r.baselines.routing_lr))
    rows = []
    for name, stage, data, cfg, *lr in phases:
        if name not in results["methods"] and name != "seed":
            continue
        info = stages.get(stage.replace(":", "-"), {})
        rows.append([name, data, str(cfg.steps), f"{cfg.batch_size} × {seq}", f"{(lr or [cfg.lr])[0]:g}",
                     _fmt_int(info.get("tokens"))])
    return rows


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
    for key in ("curves", "bars", "gates"):
        if plots.get(key):
            body.append(f'<p><img src="{plots[key].name}" style="max-width:100%"></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}")
    title = f"bts report — {html.escape(results.get('recipe', ''))}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>" \
           f"<body><h1>{title}</h1>{''.join(body)}</body></html>\n"
