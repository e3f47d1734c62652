"""The report's paper-regime sections: each phase's budget next to the paper's proportions, each expert's
specialisation and forgetting against the seed, the gates on the natural mixed-document sets, the seed's
validation curve. From run-directory files only: results.json, stages/*.json (a given seed's marker carries its
card, bts.pipeline.given.seed_reference), recipe.yaml as plain YAML, eval/gates.json, train/seed/metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

from bts.report.tables import _fmt_int, _marker, markdown_table

# The paper's phases (arXiv 2502.00075): tokens, peak lr. The seed's lr decays by cosine to 1 % of its peak.
PAPER_SEED_TOKENS, PAPER_EXPERT_TOKENS, PAPER_STITCH_TOKENS = 15e12, 200e9, 15e9
PAPER_SEED_LR, PAPER_SEED_MIN_RATIO, PAPER_LATE_LR = 4e-4, 0.01, 5e-6
STITCH_BUDGET = ("btx_top2", "btx_sampled_top1", "btx_soft", "bam", "bam_adapters")  # the paper: as the stitch


def _paper(kind: str) -> list[str]:
    """The paper's cells for a phase: tokens; shares of the seed's and an expert's tokens; peak lr."""
    seed_final = PAPER_SEED_LR * PAPER_SEED_MIN_RATIO
    late = f"{PAPER_LATE_LR:g} ({_ratio(PAPER_LATE_LR / seed_final)})"
    tokens = {"seed": PAPER_SEED_TOKENS, "expert": PAPER_EXPERT_TOKENS, "stitch": PAPER_STITCH_TOKENS}.get(kind)
    if tokens is None:
        return ["–", "–", "–"]
    lr = f"{PAPER_SEED_LR:g} → {seed_final:g} (cosine)" if kind == "seed" else late
    shares = f"{_share(tokens / PAPER_SEED_TOKENS)}, {_share(tokens / PAPER_EXPERT_TOKENS)}"
    return [{"seed": "15 T", "expert": "200 B", "stitch": "15 B"}[kind], shares, lr]


def _share(x) -> str:
    if x is None:
        return "–"
    return f"{x:.3g}×" if x >= 1 else f"{100 * x:.2g} %"


def _ratio(x) -> str:
    return "–" if x is None else f"{x:.3g}×"


def seed_phase(stages: dict, recipe: dict) -> dict | None:
    """The seed's budget: its marker's (trained in the run) or its card's (a given seed), with min_lr_ratio
    (the card's, or the recipe's seed_model.train) and whether it was given."""
    info = stages.get("seed") or {}
    card = info.get("card")
    if card is not None:
        return {**card, "given": True}
    b = info.get("budget")
    if b is None:
        return None
    ratio = (((recipe or {}).get("seed_model") or {}).get("train") or {}).get("min_lr_ratio")
    return {**b, "tokens": info.get("tokens", b["steps"] * b["batch_size"] * b["seq_len"]), "min_lr_ratio": ratio,
            "given": False}


def budget_regime(results: dict, stages: dict, recipe: dict) -> tuple[list[str], list[list[str]]]:
    """Rows: the seed, each trained expert, the stitch (bts), each trained baseline; tokens, steps × batch × seq,
    peak lr and its ratio to the seed's final lr, the share of the seed's and of an expert's (mean) tokens, and
    the paper's figures for that phase."""
    phases = []  # (name, kind, tokens, steps, batch, seq, lr)
    seed = seed_phase(stages, recipe)
    if seed is not None:
        phases.append(("seed (given: its card)" if seed["given"] else "seed", "seed", seed["tokens"],
                       seed["steps"], seed["batch_size"], seed["seq_len"], seed["lr"]))
    for name in results["methods"]:
        info = stages.get(_marker(name), {})
        b = info.get("budget")
        if name == "seed" or b is None:
            continue
        kind = "expert" if name.startswith("expert:") else "stitch" if name in ("bts", *STITCH_BUDGET) else "other"
        phases.append((name, kind, info.get("tokens", b["steps"] * b["batch_size"] * b["seq_len"]), b["steps"],
                       b["batch_size"], b["seq_len"], b["lr"]))
    seed_tokens = seed["tokens"] if seed else None
    experts = [p[2] for p in phases if p[1] == "expert"]
    expert_tokens = sum(experts) / len(experts) if experts else None
    seed_final = seed["lr"] * seed["min_lr_ratio"] if seed and seed.get("min_lr_ratio") is not None else None
    rows = []
    for name, kind, tokens, steps, batch, seq, lr in phases:
        rows.append([name, _fmt_int(tokens), f"{steps} × {batch} × {seq}",
                     _lr(lr, seed_final, kind == "seed"),
                     _share(tokens / seed_tokens) if seed_tokens else "–",
                     _share(tokens / expert_tokens) if expert_tokens else "–", *_paper(kind)])
    header = ["phase", "tokens", "steps × batch × seq", "peak lr (÷ the seed's final)", "of the seed's tokens",
              "of an expert's tokens", "paper: tokens", "paper: of the seed's, an expert's", "paper: peak lr"]
    return header, rows


def regime_note(stages: dict, recipe: dict) -> str:
    seed = seed_phase(stages, recipe)
    if seed is None:
        return ""
    final = (f"cosine to {100 * seed['min_lr_ratio']:g} % of its peak ({seed['lr'] * seed['min_lr_ratio']:g})"
             if seed.get("min_lr_ratio") is not None else "its final lr unknown")
    where = ("was given (seed_model.path), not trained in this run: its figures are its card's (seed.json)"
             if seed["given"] else "was trained in this run")
    return (f"The seed {where}; its lr: {final}. An expert's tokens: the mean over the trained experts. "
            "The paper's shares: an expert 200 B of the seed's 15 T, the stitch (and BTX, BAM) 15 B.")


def _lr(lr: float, seed_final: float | None, is_seed: bool) -> str:
    """The seed's peak → final lr; another phase's peak lr and its ratio to the seed's final."""
    if seed_final is None:
        return f"{lr:g}"
    return f"{lr:g} → {seed_final:g} (cosine)" if is_seed else f"{lr:g} ({_ratio(lr / seed_final)})"


def _delta(v) -> str:
    return "–" if v is None else f"{v:+.3f}"


def specialisation(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """Per expert, held-out loss minus the seed's: on its own domain (specialisation, negative = better), the
    mean over the other domains (forgetting) and on each natural mixed-document set; and the share of the
    expert's own-domain gain over the seed that BTS keeps."""
    methods, domains = results["methods"], results["domains"]
    if "seed" not in methods:
        return None
    seed, bts = methods["seed"], methods.get("bts")
    sets = list(results.get("mixed_docs") or {})
    rows = []
    for d in results.get("expert_domains", []):
        e = methods.get(f"expert:{d}")
        if e is None or d not in e["heldout_loss"]:
            continue
        own = e["heldout_loss"][d] - seed["heldout_loss"][d]
        others = [e["heldout_loss"][o] - seed["heldout_loss"][o] for o in domains if o != d]
        docs = [(e.get("mixed_docs_loss") or {}).get(s) for s in sets]
        base = [(seed.get("mixed_docs_loss") or {}).get(s) for s in sets]
        keeps = "–"
        if bts is not None and own < 0:
            keeps = f"{(seed['heldout_loss'][d] - bts['heldout_loss'][d]) / -own:.0%}"
        rows.append([f"expert:{d}", d, _delta(own), _delta(sum(others) / len(others) if others else None),
                     *[_delta(x - b if x is not None and b is not None else None) for x, b in zip(docs, base)],
                     keeps])
    if not rows:
        return None
    return (["expert", "own domain", "Δ own (specialisation)", "mean Δ others (forgetting)",
             *[f"Δ {s}" for s in sets], "BTS keeps of its own gain"], rows)


SPECIALISATION_NOTE = ("Δ = the expert's held-out loss minus the seed's (nats/token; negative = better than the "
                       "seed). BTS keeps: (seed − bts) ÷ (seed − expert) on the expert's own domain; – where the "
                       "expert does not beat the seed there.")


def mixed_gates(gates: dict) -> tuple[list[str], list[list[str]]] | None:
    """eval/gates.json `mixed_docs_gates` ({set: {"after block p": {member: mean weight}}}): per set the mean
    weight per member at the last E→H stitch over the set's scored tokens; the leading expert in bold."""
    table = (gates or {}).get("mixed_docs_gates")
    if not table:
        return None
    members = list(next(iter(next(iter(table.values())).values())))
    rows = []
    for name, layers in table.items():
        layer = list(layers)[-1]  # stitch positions ascend: the last is the last E→H stitch
        weights = layers[layer]
        top = max(members[1:], key=lambda m: weights[m]) if len(members) > 1 else None
        rows.append([f"{name} ({layer})"] + [f"**{weights[m]:.3f}**" if m == top else f"{weights[m]:.3f}"
                                             for m in members])
    return ["mixed-document set (last E→H stitch)", *members], rows


def seed_curve(root: Path, stages: dict) -> list[dict]:
    """The seed's validation curve: a given seed's card["curve"], else the val records of train/seed."""
    card = (stages.get("seed") or {}).get("card")
    if card is not None:
        return list(card.get("curve") or [])
    f = root / "train" / "seed" / "metrics.jsonl"
    if not f.exists():
        return []
    recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return [r for r in recs if "val_avg" in r]


def plot_seed_curve(curve: list[dict], out: Path) -> Path | None:
    if not curve:
        return None
    from bts.report.plots import plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = [r.get("tokens", r["step"]) for r in curve]
    for d in curve[-1].get("val_loss") or {}:
        ax.plot(x, [(r.get("val_loss") or {}).get(d) for r in curve], label=d, linewidth=1)
    ax.plot(x, [r["val_avg"] for r in curve], label="average", color="black", linewidth=2)
    ax.set_xlabel("tokens seen" if "tokens" in curve[0] else "step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("The seed's validation curve, per domain")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def regime_sections(root: Path, results: dict, stages: dict, recipe: dict, gates: dict | None,
                    out: Path) -> tuple[list[tuple[str, str]], dict]:
    """The sections (title, Markdown) and plots ({"seed_curve": path}) of the paper regime."""
    sections = []
    header, rows = budget_regime(results, stages, recipe)
    if rows:
        sections.append(("Budgets against the paper's (each phase; shares of the seed's and an expert's tokens)",
                         markdown_table(header, rows) + "\n\n" + regime_note(stages, recipe)))
    spec = specialisation(results)
    if spec:
        sections.append(("Specialisation and forgetting of each expert against the seed",
                         markdown_table(*spec) + "\n\n" + SPECIALISATION_NOTE))
    gate_rows = mixed_gates(gates)
    if gate_rows:
        title = ("Who feeds the hub on the natural mixed-document sets (mean weight per member over the set's "
                 "scored tokens)")
        sections.append((title, markdown_table(*gate_rows)))
    return sections, {"seed_curve": plot_seed_curve(seed_curve(root, stages), out / "seed_curve.png")}
