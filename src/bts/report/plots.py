"""The report's plots (PNG): training curves, held-out loss bars, the gate heatmap, modularity."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PLOTS = (("curves", "Training loss"), ("bars", "Held-out loss"), ("gates", "Gates"),
         ("gates_docs", "Gates on a natural mixed document"),
         ("modularity", "Modularity: removing an expert, and sparse inference"),
         ("seed_curve", "The seed's validation curve"))


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


def plot_gate_heatmap(gates: dict, out: Path, what: str = "domain switches", suffix: str = " text") -> Path:
    """Per-token mixing weight of each member at the last E→H stitch (averaged over channels; the blend gate is
    folded in, so a column sums to 1): tokens × members, from eval/gates.json's "heatmap" (bts.eval.gates.heatmap)
    or "mixed_docs_heatmap" (what: what the dashed lines mark; segments under 4 % of the width go unlabelled)."""
    mass = np.asarray(gates["mass"], dtype=np.float32)  # [members, T]
    names = gates["members"]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.45 * len(names)))
    im = ax.imshow(mass, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.5, float(mass.max())))
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(f"token position (dashed lines: {what})")
    ends = [b for b, _ in gates["bounds"][1:]] + [mass.shape[1]]
    for (b, label), end in zip(gates["bounds"], ends):
        ax.axvline(b - 0.5, color="white", linestyle="--", linewidth=1)
        if end - b >= 0.04 * mass.shape[1]:
            ax.text(b + 1, len(names) - 0.6, f"{label}{suffix}", fontsize=8, color="white", va="bottom")
    fig.colorbar(im, ax=ax, label="mixing weight")
    doc = f" — {gates['document']}" if gates.get("document") else ""
    ax.set_title(f"Who feeds the hub: last E→H stitch (after block {gates['after_block']}), per token{doc}", pad=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
