"""`bts gates MODEL TEXT_OR_FILE --out DIR [--layer K]`: what every stitch layer mixes, token by token.

Writes to DIR:
  gates.json          tokens and, per stitch layer, each token's mixing weight per member (mean over channels; the
                      blend folded in, so an E→H row sums to 1; H→E: how far each expert moves towards the hub,
                      negative where its trained blend gate tanh(a) < 0 pushes the stream away from the hub; the
                      hub's H→E entry is 0: it has no weight of its own there)
  tokens.png          tokens × members for stitch K (default: the last E→H)
  layers.png          stitch layers × members, averaged over the tokens
  gates.html          the text, each token coloured by its dominant member at stitch K (hover: all weights)
"""

import html
from pathlib import Path

import torch

from bts.cli.devices import add_device_arguments, device_of, members_dtype_of
from bts.errors import BTSError
from bts.eval.gates import token_gates

HELP = "per-token gate weights of every stitch layer: heatmaps and an HTML view of the dominant member"
COLOURS = ["#bbbbbb", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def add_arguments(p):
    p.add_argument("model", help="a saved stitched model directory")
    p.add_argument("text", help="the text, or a path to a text file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layer", type=int, help="stitch layer (1..K) for tokens.png and gates.html (default: last E→H)")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens read from the text (default 512)")
    p.add_argument("--experts-only", action="store_true", help="colour by the dominant expert, ignoring the hub")
    add_device_arguments(p)


def load_tokenizer(model_dir: str, model):
    from transformers import AutoTokenizer

    for where in (model_dir, model.config.members[0]["path"]):
        try:
            if where:
                return AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError):
            continue
    raise BTSError(f"model '{model_dir}' has no tokenizer (none in it nor in its hub's directory).")


def plot(mass: torch.Tensor, tokens: list[str], names: list[str], layer: int, kinds: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = mass.shape[1]
    fig, ax = plt.subplots(figsize=(min(40, 2 + 0.18 * t), 1.2 + 0.45 * len(names)))
    im = ax.imshow(mass[layer].T.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(names)), names)
    if t <= 120:
        ax.set_xticks(range(t), tokens, rotation=90, fontsize=6)
    else:
        ax.set_xlabel("token position")
    fig.colorbar(im, ax=ax, label="mixing weight")
    ax.set_title(f"stitch {layer + 1} ({kinds[layer]}): mixing weight per token")
    fig.tight_layout()
    _save(fig, out / "tokens.png")

    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(names), 1 + 0.45 * len(kinds)))
    import numpy as np

    avg = mass.mean(1).numpy()
    # H→E stitches mix the hub into the experts: the hub has no weight of its own there, so its cell is blank.
    hidden = np.zeros_like(avg, dtype=bool)
    hidden[[i for i, k in enumerate(kinds) if k == "h2e"], 0] = True
    im = ax.imshow(np.ma.masked_array(avg, hidden), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(kinds)), [f"{i + 1} ({k})" for i, k in enumerate(kinds)])
    for i in range(avg.shape[0]):
        for j in range(avg.shape[1]):
            text = "–" if hidden[i, j] else f"{avg[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="w" if not hidden[i, j] else "k", fontsize=7)
    fig.colorbar(im, ax=ax, label="mean mixing weight")
    ax.set_title("stitch layers × members (mean over tokens)")
    fig.tight_layout()
    _save(fig, out / "layers.png")


def _save(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    from bts.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def to_html(mass: torch.Tensor, tokens: list[str], names: list[str], experts_only: bool, title: str) -> str:
    """Tokens coloured by their dominant member (opacity: its weight); hovering shows every weight."""
    first = 1 if experts_only else 0
    spans = []
    for t, tok in enumerate(tokens):
        w = mass[t]
        top = first + int(w[first:].argmax())
        colour = COLOURS[top % len(COLOURS)]
        alpha = float(w[top] / w[first:].sum().clamp_min(1e-9)) if experts_only else float(w[top])
        hover = ", ".join(f"{n} {float(v):.3f}" for n, v in zip(names, w))
        spans.append(f'<span title="{html.escape(hover)}" style="background:{colour}{int(255 * min(1, max(0.15, alpha))):02x}">'
                     f"{html.escape(tok)}</span>")
    legend = " ".join(f'<span style="background:{COLOURS[i % len(COLOURS)]};padding:0 6px">{html.escape(n)}</span>'
                      for i, n in enumerate(names) if i >= first)
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<body style='font-family:sans-serif'><h3>{html.escape(title)}</h3><p>{legend}</p>"
            f"<pre style='white-space:pre-wrap;line-height:1.6'>{''.join(spans)}</pre></body>")


def run(args):
    from bts.atomic import atomic_write_json, atomic_write_text
    from bts.core.model import BTSForCausalLM

    device = device_of(args)
    model = BTSForCausalLM.from_pretrained(args.model, dtype=members_dtype_of(args, device), device_map=device).eval()
    text = Path(args.text).read_text(encoding="utf-8") if Path(args.text).is_file() else args.text
    if not text.strip():
        raise BTSError("TEXT_OR_FILE is empty; give some text or a non-empty file.")
    if args.max_tokens < 2:
        raise BTSError(f"--max-tokens must be at least 2 (got {args.max_tokens}).")
    kinds = list(model.config.stitch_kinds)
    layer = args.layer if args.layer is not None else max(i for i, k in enumerate(kinds) if k == "e2h") + 1
    if not 1 <= layer <= len(kinds):
        raise BTSError(f"--layer must be between 1 and the model's {len(kinds)} stitch layers (got {layer}).")
    tok = load_tokenizer(args.model, model)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: args.max_tokens], dtype=torch.long)
    if len(ids) == 0:
        raise BTSError("TEXT_OR_FILE has no tokens under this model's tokenizer.")
    tokens = [tok.decode([i]) for i in ids.tolist()]
    mass = token_gates(model, ids)  # [layers, T, members]
    names = [model.config.members[0]["name"]] + list(model.config.expert_names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "gates.json", {
        "members": names, "tokens": tokens, "stitch_positions": model.config.stitch_positions, "kinds": kinds,
        "layers": [{"stitch": i + 1, "kind": k, "mean": dict(zip(names, mass[i].mean(0).tolist())),
                    "per_token": [[round(v, 5) for v in row] for row in mass[i].tolist()]}
                   for i, k in enumerate(kinds)]})
    plot(mass, tokens, names, layer - 1, kinds, out)
    title = f"dominant {'expert' if args.experts_only else 'member'} per token at stitch {layer} ({kinds[layer - 1]})"
    atomic_write_text(out / "gates.html", to_html(mass[layer - 1], tokens, names, args.experts_only, title))
    mean = mass[layer - 1].mean(0)
    print(f"wrote {out}/gates.json, tokens.png, layers.png, gates.html ({len(tokens)} tokens); stitch {layer} mean: "
          + ", ".join(f"{n} {float(v):.3f}" for n, v in zip(names, mean)))
    return 0
