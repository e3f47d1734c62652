"""What the stitches mix: gate tables per domain, per token, at domain switches, and sparse inference.

    gate_summary(model, ids)          mean mixing weight per member at every stitch (logged while training)
    gate_table(model, windows)        per domain and E→H stitch: each member's share of the hub's new state
    token_gates(model, ids)           [layers, T, members]: each token's mixing weight per member at every stitch
    heatmap(model, ids, bounds)       the report's gate heatmap data (last E→H stitch, per token), JSON-ready
    switch_table / segment_dominance  does the leading expert change where the text changes domain?
    sparse_table(model, windows)      held-out loss with only the top-k experts active, k = 1..n

The per-token dominant expert (`dominant`) is the expert with the most mixing weight at the last E→H stitch; the
hub is left out, since it carries most of the mass everywhere.
"""

from __future__ import annotations

import torch

from bts.core.device import model_device
from bts.core.stitch import E2H
from bts.errors import BTSError
from bts.eval.heldout import heldout_loss


@torch.no_grad()
def gate_summary(model, ids: torch.Tensor) -> list[dict]:
    """Mean mixing weight per member for every stitch layer on a probe (E→H: share of the new hub state;
    H→E: how far expert streams move towards the hub), plus the blend strength |tanh(a)| with the blend init."""
    was_training = model.training
    model.eval()
    gates = model.gate_values(_on(model, ids.view(1, -1) if ids.dim() == 1 else ids), effective=True)
    names = ["hub"] + list(model.config.expert_names)
    out = []
    for stitch, g in zip(model.stitches, gates):
        mean = g.mean(dim=(0, 1, 3)).tolist()  # over batch, tokens, channels -> per member
        row = {"kind": stitch.kind, **{n: round(v, 4) for n, v in zip(names, mean)}}
        if stitch.blend is not None:
            row["blend"] = round(torch.tanh(stitch.blend).abs().mean().item(), 4)
        out.append(row)
    model.train(was_training)
    return out


@torch.no_grad()
def gate_table(model, windows: dict[str, torch.Tensor], batch_size: int = 8) -> dict:
    """Mean mixing weight of each member at each E→H stitch on each domain's windows:
    {domain: {"after block p": {member: mass}}} (the blend is folded in, so each row sums to 1)."""
    names = ["hub"] + list(model.config.expert_names)
    e2h = [i for i, k in enumerate(model.config.stitch_kinds) if k == E2H]
    table = {}
    for domain, w in windows.items():
        sums, count = None, 0
        for i in range(0, len(w), batch_size):
            gates = model.gate_values(_on(model, w[i:i + batch_size]), effective=True)
            mass = torch.stack([gates[j].mean(-1).sum((0, 1)) for j in e2h])  # [layers, members]
            sums = mass if sums is None else sums + mass
            count += w[i:i + batch_size].shape[:2].numel()
        mean = (sums / count).tolist()
        table[domain] = {f"after block {model.config.stitch_positions[j]}": dict(zip(names, map(float, row)))
                         for j, row in zip(e2h, mean)}
    return table


def _on(model, ids: torch.Tensor) -> torch.Tensor:
    """Token ids on the model's device (gates are computed where the model is; tables come back as numbers)."""
    return ids.to(model_device(model))


def last_e2h(model) -> int:
    """Index of the last E→H stitch layer."""
    return max(i for i, k in enumerate(model.config.stitch_kinds) if k == E2H)


def dominant(model, ids: torch.Tensor) -> torch.Tensor:
    """Per token, the index of the expert with the most mixing weight at the last E→H stitch ([B, T]). The hub is
    left out: it carries most of the mass everywhere, so the question is which expert leads."""
    return model.gate_values(_on(model, ids), effective=True)[last_e2h(model)].mean(-1)[..., 1:].argmax(-1).cpu()


@torch.no_grad()
def token_gates(model, ids: torch.Tensor) -> torch.Tensor:
    """[layers, T, members]: each token's mixing weight per member at every stitch, mean over channels."""
    gates = model.gate_values(_on(model, ids.view(1, -1)), effective=True)
    return torch.stack([g[0].mean(-1) for g in gates]).cpu()


@torch.no_grad()
def heatmap(model, ids: torch.Tensor, bounds: list[tuple[int, str]]) -> dict:
    """Per-token mixing weight of each member at the last E→H stitch (averaged over channels; the blend gate is
    folded in, so a column sums to 1) on one text: what the report's gate heatmap draws, with the text's domain
    boundaries [(start, domain)]. `mass` is [members][tokens] (float32 values, exact through JSON)."""
    last = last_e2h(model)
    mass = model.gate_values(_on(model, ids.view(1, -1)), effective=True)[last][0].mean(-1).T  # [members, T]
    return {"members": ["hub"] + list(model.config.expert_names), "stitch": last,
            "after_block": model.config.stitch_positions[last], "bounds": [[int(b), d] for b, d in bounds],
            "mass": mass.tolist()}


@torch.no_grad()
def switch_table(model, streams: dict[str, torch.Tensor], half: int, windows: int = 16) -> dict:
    """Does the dominant expert switch when the text changes domain? For every ordered pair (a, b) of expert
    domains: `windows` windows of a's held-out text (half tokens) followed by b's; per pair the fraction of tokens
    before the boundary whose dominant expert is a's, after it b's, and the fraction of windows whose most frequent
    dominant expert is a's before and b's after."""
    names = list(model.config.expert_names)
    domains = [d for d in names if d in streams]
    pairs = {}
    for a in domains:
        for b in domains:
            if a == b:
                continue
            n = min(windows, len(streams[a]) // half, len(streams[b]) // half)
            ids = torch.stack([torch.cat([streams[a][i * half:(i + 1) * half], streams[b][i * half:(i + 1) * half]])
                               for i in range(n)])
            dom = dominant(model, ids)
            first, second = dom[:, :half], dom[:, half:]
            ia, ib = names.index(a), names.index(b)
            switched = (first.mode(-1).values == ia) & (second.mode(-1).values == ib)
            pairs[f"{a}→{b}"] = {"before": float((first == ia).float().mean()),
                                 "after": float((second == ib).float().mean()),
                                 "switched": float(switched.float().mean()), "windows": n}
    mean = {k: sum(p[k] for p in pairs.values()) / len(pairs) for k in ("before", "after", "switched")} if pairs else {}
    return {"pairs": pairs, **mean, "chance": 1 / len(names), "half": half}


@torch.no_grad()
def segment_dominance(model, ids: torch.Tensor, bounds: list[tuple[int, str]]) -> list[dict]:
    """Per domain segment of one text: the most frequent dominant expert and the share of tokens led by the
    segment's own expert (None when no expert is named like the domain)."""
    names = list(model.config.expert_names)
    dom = dominant(model, ids.view(1, -1))[0]
    ends = [start for start, _ in bounds[1:]] + [len(ids)]
    out = []
    for (start, domain), end in zip(bounds, ends):
        seg = dom[start:end]
        own = float((seg == names.index(domain)).float().mean()) if domain in names else None
        out.append({"domain": domain, "start": start, "end": end, "dominant": names[int(seg.mode().values)],
                    "own_share": own})
    return out


@torch.no_grad()
def sparse_table(model, windows: dict[str, torch.Tensor]) -> dict:
    """Sparse inference per expert domain (as benchmarks/bench_sparse.py, without timing): the top-k experts are
    chosen on the first held-out window (model.top_experts) and the rest of the windows are scored with only them
    active, for k = 1..n, against the full model on the same windows."""
    names = list(model.config.expert_names)
    if not any(d in windows and len(windows[d]) >= 2 for d in names):
        raise BTSError(f"sparse_table scores each expert on its own domain: give windows keyed by expert names "
                       f"({', '.join(names)}), at least 2 per domain (got {', '.join(windows) or 'none'}).")
    table = {}
    try:
        for d in names:
            if d not in windows or len(windows[d]) < 2:
                continue
            probe, scored = windows[d][:1], windows[d][1:]
            model.set_active_experts(None)
            full = heldout_loss(model, scored)
            rows = []
            for k in range(1, len(names) + 1):
                chosen = model.top_experts(_on(model, probe), k)
                model.set_active_experts(chosen)
                loss = heldout_loss(model, scored)
                rows.append({"k": k, "experts": chosen, "loss": loss, "change_pct": 100 * (loss / full - 1)})
            table[d] = {"full": full, "windows": len(scored), "k": rows}
    finally:
        model.set_active_experts(None)
    return table
