"""`bts inspect DIR`: what a saved stitched model is made of, read from its config and weight headers only."""

import json
from pathlib import Path

from safetensors import safe_open

from bts.errors import BTSError
from bts.core.members import weights_sha256
from bts.core.stitch import E2H

HELP = ("print members (and how their settings differ), stitch layout, trainable vs frozen parameters and memory "
        "estimates of a stitched model")
SETTINGS = ("rope", "context", "dtype", "vocab rows", "window")


def add_arguments(p):
    p.add_argument("model_dir", help="a directory written by `bts build` or the pipeline (models/bts)")


def _count(model_dir: Path) -> int:
    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for key in fh.keys():
                n = 1
                for s in fh.get_slice(key).get_shape():
                    n *= s
                total += n
    return total


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.3f} GiB" if n_bytes >= 2**27 else f"{n_bytes / 2**20:.1f} MiB"


def run(args):
    root = Path(args.model_dir)
    cfg_path = root / "config.json"
    if not cfg_path.exists() or not (root / "stitch.safetensors").exists():
        raise BTSError(f"'{root}' is not a saved bts model (needs config.json and stitch.safetensors).")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "bts":
        raise BTSError(f"'{root}' has model_type '{cfg.get('model_type')}', not 'bts'.")
    base = cfg["base_config"]
    d, n = base["hidden_size"], cfg["num_experts"]
    print(f"bts model {root}: {base['model_type']}, {base['num_hidden_layers']} layers, d={d}, vocab {base['vocab_size']}")
    print("members:")
    member_params, problems = 0, []
    for m in cfg["members"]:
        path = Path(m["path"]) if Path(m["path"]).is_absolute() else root / m["path"]
        count = _count(path) if path.is_dir() else None
        member_params += count or 0
        state = ""
        if count is None:
            state = "  MISSING"
            problems.append(f"'{m['name']}' is missing")
        elif m.get("sha256") and weights_sha256(path) != m["sha256"]:
            state = "  CHANGED since saved"
            problems.append(f"'{m['name']}' has changed")
        shown = f"{count:,}" if count is not None else "–"
        print(f"  {m['name']:<16} {shown:>14} params (frozen)  {m['path']}  sha256 {str(m.get('sha256'))[:12]}{state}")
    _member_settings(root, cfg["members"])
    print("stitch layers:")
    with safe_open(root / "stitch.safetensors", "pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    stitch_total = 0
    for i, (pos, kind) in enumerate(zip(cfg["stitch_positions"], cfg["stitch_kinds"])):
        n_i = sum(_prod(s) for k, s in shapes.items() if k.startswith(f"{i}."))
        stitch_total += n_i
        arrow = "experts→hub (softmax)" if kind == E2H else "hub→experts (sigmoid)"
        print(f"  {i + 1} after block {pos:>3}: {arrow:<22} {n_i:>12,} trainable  (paper: (2n+1)d² = {(2*n+1)*d*d:,})")
    output = cfg.get("stitch_output", "hub")
    if output != "hub":  # bts.core.heads: the output also mixes the experts' final norms and heads
        n_out = sum(_prod(s) for k, s in shapes.items() if k.startswith("output."))
        stitch_total += n_out
        print(f"  output mix ({output}): {n_out:,} trainable; every expert runs to its last block and uses its head")
    # Loaded: with the hub's output the experts' LM heads are never used, so bts does not load them (unless tied).
    base = cfg["base_config"]
    heads = 0 if base.get("tie_word_embeddings") or output != "hub" else n * base["vocab_size"] * d
    total = member_params - heads + stitch_total
    unused = f"the members' files hold {heads:,} more in the experts' LM heads, which bts does not use" if heads \
        else "every member weight is used"
    print(f"trainable {stitch_total:,} / total {total:,} loaded ({100 * stitch_total / max(total, 1):.2f}%; {unused}); "
          f"init {cfg['stitch_init']}, expert stream after E→H: {cfg['expert_stream']}, output: {output}")
    adam = stitch_total * 4 * 3  # fp32 gradient + two AdamW moments
    for name, width in (("fp32", 4), ("bf16", 2)):
        weights = (member_params - heads) * width + stitch_total * 4
        print(f"memory, members in {name}: weights {_gib(weights)}; training adds {_gib(adam)} for stitch "
              f"gradients + AdamW (members hold none), plus activations")
    if problems:
        raise BTSError(f"member {', '.join(problems)}; this stitched model will not load until it is restored.")
    return 0


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _rope(config: dict) -> str:
    """A member's rotary embedding in a few characters: θ, type and factor (per layer type where it has several)."""
    params = config.get("rope_parameters")
    if params is None:  # older configs: rope_theta and rope_scaling
        params = {"rope_theta": config.get("rope_theta"), **(config.get("rope_scaling") or {})}
    if params and all(isinstance(v, dict) for v in params.values()):
        return ", ".join(f"{kind.split('_')[0]}: {_rope({'rope_parameters': p})}" for kind, p in params.items())
    kind = params.get("rope_type") or params.get("type") or "default"
    theta = params.get("rope_theta")
    out = f"θ={theta:g}" if isinstance(theta, (int, float)) else "θ=?"
    out += f" {kind}" if kind == "default" else f" {kind}×{params.get('factor', '?')}"
    return out


def _member_settings(root: Path, members: list) -> None:
    """What each member runs with (its own rotary, context, dtype, vocabulary rows, sliding window); a * marks a
    value that differs from the hub's. The stitched model's context is the shortest member's."""
    rows = []
    for m in members:
        path = Path(m["path"]) if Path(m["path"]).is_absolute() else root / m["path"]
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            continue
        rows.append((m["name"], {"rope": _rope(config), "context": config.get("max_position_embeddings"),
                                 "dtype": config.get("dtype") or config.get("torch_dtype"),
                                 "vocab rows": config.get("vocab_size"), "window": config.get("sliding_window")}))
    if not rows:
        return
    hub = rows[0][1]
    print("member settings (each member runs with its own; * differs from the hub):")
    for name, values in rows:
        shown = "  ".join(f"{key} {values[key] if values[key] is not None else '–'}{'*' if values[key] != hub[key] else ''}"
                          for key in SETTINGS)
        print(f"  {name:<16} {shown}")
    known = [(v["context"], name) for name, v in rows if isinstance(v["context"], int)]
    if known:
        context, name = min(known)
        print(f"context: {context:,} tokens (the shortest member's, '{name}')")
