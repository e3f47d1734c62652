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
from bts.baselines.registry import REGISTRY  # noqa: E402


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
    modularity_file = root / "modularity" / "results.json"
    # Results of a modularity stage that the recipe no longer enables are not this recipe's: leave them out.
    enabled = run.recipe.modularity.enabled
    modularity = json.loads(modularity_file.read_text()) if enabled and modularity_file.exists() else None
    gates = modularity["gates"] if modularity else None
    if "bts" in results["methods"]:
        from bts.pipeline.modularity import switch_text
        from bts.pipeline.run import _load_bts

        model, _ = _load_bts(root / "models" / "bts")
        ids, bounds = switch_text(run)
        plots["gates"] = plot_gate_heatmap(model, run.tokenizer(), ids, bounds, out / "gates.png")
        if gates is None:  # the modularity stage measured the same table; otherwise measure it here
            from bts.data.streams import eval_windows
            from bts.pipeline.modularity import gate_table

            seq = run.recipe.data.seq_len
            gates = gate_table(model, {d: eval_windows(run.stream(d, "heldout"), seq, 8 * seq) for d in run.domains})
    provenance = {d: json.loads((root / "data" / d / "provenance.json").read_text())
                  for d in results["domains"] if (root / "data" / d / "provenance.json").exists()}
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((root / "stages").glob("*.json"), key=_pipeline_order)}
    sections = build_sections(run, results, provenance, stages)
    extra = []
    if gates:
        extra.append((GATES_TITLE, gate_markdown(gates) + ("\n\n" + gate_sentence(gates) if modularity else "")))
    if modularity:
        extra = modularity_sections(modularity, gates_section=extra)
        plots["modularity"] = plot_modularity(modularity, out / "modularity.png")
    sections[2:2] = extra
    md = "\n\n".join(f"## {title}\n\n{body}" for title, body in sections)
    md = f"# bts report — {results.get('recipe', '')}\n\n{md}\n"
    for key, label in PLOTS:
        if plots.get(key):
            md += f"\n![{label}]({plots[key].name})\n"
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", to_html(results, sections, plots))
    return out / "report.md"


PLOTS = (("curves", "Training loss"), ("bars", "Held-out loss"), ("gates", "Gates"),
         ("modularity", "Modularity: removing an expert, and sparse inference"))
GATES_TITLE = ("Who feeds the hub, per domain (mean mixing weight at each E→H stitch on held-out text; "
               "the matching expert should lead among the experts)")


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
        from bts.eval.downstream.scoring import markdown_table as downstream_table

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
    sections.append(("Stages (wall time per stage, in pipeline order)",
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
        budget = REGISTRY[m].budget(r)
        if budget is not None:
            phases.append((m, f"baseline:{m}", mix, budget))
    rows = []
    for name, stage, data, cfg in phases:
        if name not in results["methods"] and name != "seed":
            continue
        info = stages.get(stage.replace(":", "-"), {})
        rows.append([name, data, str(cfg.steps), f"{cfg.batch_size} × {seq}", f"{cfg.lr:g}",
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
    for key, _ in PLOTS:
        if plots.get(key):
            body.append(f'<p><img src="{plots[key].name}" style="max-width:100%"></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}")
    title = f"bts report — {html.escape(results.get('recipe', ''))}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>" \
           f"<body><h1>{title}</h1>{''.join(body)}</body></html>\n"


# ---- modularity (modularity/results.json, written by the modularity stage) --------------------------------------
def _names(items) -> str:
    return ", ".join(items) if items else "none"


def _largest_change(changes: dict) -> str:
    """'raised … by at most +x (removing a, on b)' from {(removed, domain): change}, whatever its sign."""
    (removed, domain), worst = max(changes.items(), key=lambda kv: kv[1])
    if worst > 0:
        return f"raised another domain's loss by at most {worst:+.4f} (removing {removed}, on {domain})"
    return f"lowered every other domain's loss (the smallest drop: {worst:+.4f}, removing {removed}, on {domain})"


def gate_sentence(gates: dict) -> str:
    """Which expert leads on each domain's text at the last E→H stitch, and how much the hub keeps."""
    matched, missed, hub = [], [], []
    for domain, layers in gates.items():
        layer, weights = list(layers.items())[-1]
        hub.append(weights["hub"])
        if domain not in weights:
            continue
        top = max((m for m in weights if m != "hub"), key=lambda m: weights[m])
        (matched if top == domain else missed).append(domain if top == domain else f"{domain}: {top}")
    total = len(matched) + len(missed)
    text = (f"At the last E→H stitch ({layer}) the domain's own expert carries the most weight among the experts on "
            f"{len(matched)} of {total} domains")
    text += f" (exceptions, domain: leading expert — {_names(missed)})." if missed else "."
    return text + f" The hub keeps {sum(hub) / len(hub):.0%} of the mass on average."


def modularity_sections(m: dict, gates_section: list | None = None) -> list[tuple[str, str]]:
    """The Modularity part of the report: tables (a) adding, (b) removing, (c) the removed domain, the gates per
    domain and at domain switches, and sparse inference, each with sentences computed from the numbers."""
    domains = [d for d in m["seed"] if d != "avg"]
    cols = [*domains, "avg"]
    header = ["model", *cols]
    steps = m["full_stitch_steps"]

    def row(label, losses):
        return [label, *(f"{losses[d]:.4f}" for d in cols)]

    intro = (f"Measured by the modularity stage (docs/modularity.md) on {m['settings'].get('heldout_tokens') or 'all'}"
             f" held-out tokens per domain; losses in nats/token, lower is better.")
    sections = []
    add = m["add"]
    e, k = add["expert"], add["steps"]
    rows = [row("seed", m["seed"]), row(f"stitched from scratch, all experts ({steps} steps)", m["full"]),
            row(f"stitched without {e} ({steps} steps)", add["without"]),
            row(f"+ {e}, new slots only ({k} steps)", add["added_new"]),
            row(f"+ {e}, all stitch parameters ({k} steps)", add["added_all"])]
    gap = add["without"][e] - m["full"][e]
    text = (f"Adding {e} with {k} steps ({k / steps:.0%} of the {steps} stitch steps): its own loss went from "
            f"{add['without'][e]:.4f} without it to {add['added_new'][e]:.4f} (new slots only) and "
            f"{add['added_all'][e]:.4f} (all stitch parameters), against {m['full'][e]:.4f} stitched from scratch")
    if gap > 0:
        shares = [(add["without"][e] - add[f"added_{mode}"][e]) / gap for mode in ("new", "all")]
        text += f": {shares[0]:.0%} and {shares[1]:.0%} of the way to it."
    else:
        text += f"; stitching from scratch with {e} was not better on {e} than without it, so there was no gap."
    moved = [max(abs(add[f"added_{mode}"][d] - add["without"][d]) for d in domains if d != e)
             for mode in ("new", "all")]
    text += (f" The other domains' loss moved by at most {moved[0]:.4f} (new slots only) and {moved[1]:.4f} (all "
             f"parameters). Average: {add['added_new']['avg']:.4f} and {add['added_all']['avg']:.4f}, against "
             f"{m['full']['avg']:.4f} from scratch. Before training, the grown model's average loss differed from the "
             f"smaller model's by {add['init_avg_loss_diff']:.1e} (an added expert starts with exactly no weight).")
    sections.append((f"Modularity (a): adding the last expert ({e}) with {k} of {steps} stitch steps",
                     intro + "\n\n" + markdown_table(header, rows) + "\n\n" + text))

    remove = m["remove"]
    r = next(iter(remove.values()))["retrain_steps"]
    rows = [row("all experts", m["full"])]
    for name, entry in remove.items():
        rows += [row(f"− {name}", entry["removed"]), row(f"− {name}, retrained {r} steps", entry["retrained"])]
    change = {key: {(n, d): entry[key][d] - m["full"][d] for n, entry in remove.items() for d in domains if d != n}
              for key in ("removed", "retrained")}
    below = {key: sum(v < 0 for v in change[key].values()) for key in change}
    text = (f"Without retraining, removing an expert {_largest_change(change['removed'])}; after {r} retraining "
            f"steps it {_largest_change(change['retrained'])}. Other-domain entries below the full model's loss: "
            f"{below['removed']} of {len(change['removed'])} without retraining, {below['retrained']} after.")
    sections.append((f"Modularity (b): removing each expert — every domain's held-out loss, without and with {r} "
                     "retraining steps", markdown_table(header, rows) + "\n\n" + text))

    own = [n for n in remove if n in m["seed"]]
    rows = [[n, f"{m['full'][n]:.4f}", f"{remove[n]['removed'][n]:.4f}", f"{remove[n]['retrained'][n]:.4f}",
             f"{m['seed'][n]:.4f}"] for n in own]
    text = ""
    if own:
        above = {key: [n for n in own if remove[n][key][n] > m["seed"][n]] for key in ("removed", "retrained")}
        rose = [n for n in own if remove[n]["removed"][n] > m["full"][n]]
        gained = [n for n in own if m["seed"][n] > m["full"][n]]
        text = (f"Removing a domain's expert raised that domain's loss (back towards the seed) on {len(rose)} of "
                f"{len(own)} domains. It ended above the seed's loss (worse than the seed) on "
                f"{_names(above['removed'])} without retraining and on {_names(above['retrained'])} after it; at or "
                f"below the seed on the others.")
        if gained:
            lost = [(remove[n]["removed"][n] - m["full"][n]) / (m["seed"][n] - m["full"][n]) for n in gained]
            text += (f" Of what the stitched model had gained over the seed on its domain, removal took back "
                     f"{sum(lost) / len(lost):.0%} on average ({min(lost):.0%} to {max(lost):.0%}).")
    sections.append(("Modularity (c): the removed expert's own domain against the seed", markdown_table(
        ["removed", "own-domain loss with it", "removed", f"removed + retrained {r} steps", "seed"], rows)
        + ("\n\n" + text if text else "")))

    sections += gates_section or []
    sw = m.get("switch")
    if sw and sw.get("pairs"):
        rows = [[pair, str(p["windows"]), f"{p['before']:.0%}", f"{p['after']:.0%}", f"{p['switched']:.0%}"]
                for pair, p in sw["pairs"].items()]
        rows.append(["mean", "", f"{sw['before']:.0%}", f"{sw['after']:.0%}", f"{sw['switched']:.0%}"])
        text = (f"Each window is {sw['half']} held-out tokens of one domain followed by {sw['half']} of another; an "
                f"expert leads a token when it has the most mixing weight among the experts at the last E→H stitch. "
                f"The first domain's expert leads {sw['before']:.0%} of the tokens before the boundary, the second "
                f"domain's expert {sw['after']:.0%} after it (chance: {sw['chance']:.0%}); the leading expert of the "
                f"two halves switched from the first domain's to the second's in {sw['switched']:.0%} of the windows.")
        segments = sw.get("heatmap_text") or []
        if segments:
            text += " On the text of the gate heatmap (gates.png): " + "; ".join(
                f"the {s['domain']} part is led mostly by {s['dominant']}"
                + (f" (own expert on {s['own_share']:.0%} of its tokens)" if s["own_share"] is not None else "")
                for s in segments) + "."
        sections.append(("Modularity: does the leading expert switch where the text changes domain?",
                         markdown_table(["text (first → second domain)", "windows", "before: first's expert leads",
                                         "after: second's expert leads", "windows that switch"], rows)
                         + "\n\n" + text))

    sparse = m.get("sparse")
    if sparse:
        n = len(m["experts"])
        rows, worst_k1, k1 = [], None, None
        for k in range(1, n + 1):
            changes = {d: e["k"][k - 1]["change_pct"] for d, e in sparse.items()}
            worst = max(changes, key=changes.get)
            chosen = "all" if k == n else "; ".join(f"{d}: {'+'.join(e['k'][k - 1]['experts'])}"
                                                     for d, e in sparse.items())
            mean = sum(changes.values()) / len(changes)
            rows.append([str(k), f"{mean:+.2f}%", f"{changes[worst]:+.2f}% ({worst})", chosen])
            if k == 1:
                k1, worst_k1 = mean, (worst, changes[worst])
        own1 = [d for d, e in sparse.items() if e["k"][0]["experts"] == [d]]
        windows = next(iter(sparse.values()))["windows"]
        text = (f"Experts are chosen per domain from the gate mass on its first held-out window "
                f"(model.top_experts), and the next {windows} windows are scored with only those experts running, "
                f"against the full model on the same windows. With the top-1 expert the loss changed by {k1:+.2f}% "
                f"on average (worst: {worst_k1[1]:+.2f}% on {worst_k1[0]}); the top-1 choice was the domain's own "
                f"expert on {len(own1)} of {len(sparse)} domains.")
        sections.append(("Modularity: sparse inference — held-out loss with only the top-k experts, against the "
                         "full model", markdown_table(["k active", "mean loss change", "worst domain",
                                                       "experts chosen, per domain"], rows) + "\n\n" + text))
    return sections


def plot_modularity(m: dict, out: Path) -> Path:
    """Left: each domain's loss with every expert, without its expert (and retrained), and the seed's. Right:
    sparse inference, the loss change per domain against k."""
    own = [n for n in m["remove"] if n in m["seed"]]
    fig, axes = plt.subplots(1, 2 if m.get("sparse") else 1, figsize=(12, 4.5), squeeze=False)
    ax = axes[0][0]
    bars = [("all experts", [m["full"][n] for n in own]),
            ("its expert removed", [m["remove"][n]["removed"][n] for n in own]),
            ("removed + retrained", [m["remove"][n]["retrained"][n] for n in own]),
            ("seed", [m["seed"][n] for n in own])]
    width = 0.8 / len(bars)
    for i, (label, vals) in enumerate(bars):
        ax.bar([j + i * width for j in range(len(own))], vals, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(own))], own)
    lo = min(min(v) for _, v in bars)
    hi = max(max(v) for _, v in bars)
    ax.set_ylim(lo - 0.5 * (hi - lo) - 1e-3, hi + 0.2 * (hi - lo) + 1e-3)
    ax.set_ylabel("held-out loss on the domain (nats/token)")
    ax.set_title("Removing a domain's expert: that domain's loss")
    ax.legend(fontsize=8)
    if m.get("sparse"):
        ax = axes[0][1]
        for d, e in m["sparse"].items():
            ax.plot([r["k"] for r in e["k"]], [r["change_pct"] for r in e["k"]], marker="o", label=d)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks([r["k"] for r in next(iter(m["sparse"].values()))["k"]])
        ax.set_xlabel("active experts k (top-k by gate mass on the first window)")
        ax.set_ylabel("held-out loss change vs full model (%)")
        ax.set_title("Sparse inference")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _pipeline_order(marker: Path) -> int:
    """Stage markers in the order the pipeline runs them (file times change when a run directory is copied)."""
    from bts.pipeline.run import STAGES

    stage = "experts" if marker.stem.startswith("expert-") else marker.stem
    return STAGES.index(stage) if stage in STAGES else len(STAGES)
