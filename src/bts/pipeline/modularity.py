"""Growing and shrinking a stitched model: add an expert, remove one, and measure what that costs.

    bigger = add_expert(model, "models/expert-legal", name="legal")     # outputs equal model's (≤ 1e-4)
    train_stitches(bigger, batches, cfg, "train/add-legal", only="legal") # short training of the new slots only
    smaller = remove_expert(model, "code")                                # usable at once: gates renormalised

Members are frozen and shared: the new model reuses the input model's hub and expert objects (nothing is copied or
reloaded), and only the stitch tensors are rebuilt. Each stitch tensor has a member axis (W_proj_i, the rows of
W_gate, the H→E blend, the E→H presence), so adding or removing an expert is slicing along it (`_member_views`).

Exactness when adding: a new expert gets identity projections and zero gate rows like any fresh stitch, and an E→H
presence weight p = 0 inside the softmax (bts.core.stitch): g_i ∝ p_i·exp(z_i). With p = 0 it has exactly no mass and the
old members keep theirs, but ∂L/∂p ≠ 0, so training opens it at once. p is kept ≥ 0 by projection after each step
(a channel the data pushes below 0 is set back to 0 and stays trainable).

Removing: the expert's slices are dropped; the E→H softmax then renormalises over the remaining members, which is
what sparse inference with those members does too (BTSForCausalLM.set_active_experts).

`measure_modularity(run)` is the experiment of docs/modularity.md on a finished pipeline run; the pipeline's
`modularity` stage runs it (recipe section `modularity:`) and the report shows it (bts.report.modularity_sections).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from bts.eval.heldout import heldout_loss
from bts.errors import BTSError
from bts.core.stitch import E2H, H2E, StitchLayer

# ---- the member axis of every stitch tensor -------------------------------------------------------------------


def _member_views(layer: StitchLayer) -> dict[str, tuple[torch.Tensor, int]]:
    """parameter name -> (a view with the member axis first, offset of expert 0 on it: 1 when the hub is row 0).
    The E→H blend is per hub channel (no member axis) and is not listed."""
    n, d = layer.n, layer.d
    views = {"proj": (layer.proj, 0), "gate.weight": (layer.gate.weight.view(n + 1, d, d), 1)}
    if layer.gate.bias is not None:
        views["gate.bias"] = (layer.gate.bias.view(n + 1, d), 1)
    if layer.blend is not None and layer.kind == H2E:
        views["blend"] = (layer.blend, 0)
    if layer.presence is not None:
        views["presence"] = (layer.presence, 1)
    return views


@torch.no_grad()
def _transfer(old: StitchLayer, new: StitchLayer, pairs: list[tuple[int, int]]) -> None:
    """Copy the hub's rows, the per-hub tensors and expert rows old[j] -> new[i] for (i, j) in pairs."""
    if old.blend is not None and old.kind == E2H:
        new.blend.copy_(old.blend)
    old_views = _member_views(old)
    for key, (view, offset) in _member_views(new).items():
        if key not in old_views:  # presence added now: every old member is fully present
            continue
        src, _ = old_views[key]
        if offset:
            view[0] = src[0]
        for i, j in pairs:
            view[i + offset] = src[j + offset]


def _expert_index(model, name: str) -> int:
    names = list(model.config.expert_names)
    if name not in names:
        raise BTSError(f"expert '{name}' is not in this model (experts: {', '.join(names)}).")
    return names.index(name)


def _rebuild(model, experts: list, names: list[str]):
    """A model with the same hub and stitch layout over another list of experts (fresh stitch tensors)."""
    from bts.core.model import BTSForCausalLM

    cfg = model.config
    new = BTSForCausalLM.from_members(
        model.hub, experts, names=names, hub_name=cfg.members[0]["name"], positions=list(cfg.stitch_positions),
        all_e2h=all(k == E2H for k in cfg.stitch_kinds), init=cfg.stitch_init, beta=cfg.stitch_beta,
        gate_dropout=cfg.gate_dropout, expert_stream=cfg.expert_stream)
    if list(new.config.stitch_kinds) != list(cfg.stitch_kinds):  # a hand-edited layout from_members cannot redo
        raise BTSError(f"stitch_kinds {cfg.stitch_kinds} of the model cannot be rebuilt by bts; "
                       "add or remove experts only on models built by bts.")
    new.generation_config = model.generation_config
    new.stitches.to(next(model.stitches.parameters()).device)
    return new.eval()


# ---- add and remove --------------------------------------------------------------------------------------------
def add_expert(model, new_expert, name: str | None = None):
    """A model with one more expert whose outputs equal `model`'s (the new expert starts with presence 0).
    new_expert: a model directory, a cached hub id or a loaded *ForCausalLM branched from the same hub."""
    if name is None:
        name = Path(str(new_expert)).name if not isinstance(new_expert, torch.nn.Module) else "new"
    names = list(model.config.expert_names)
    if name in names or name == model.config.members[0]["name"]:
        raise BTSError(f"name '{name}' is already a member of this model; choose another --name.")
    if not isinstance(new_expert, torch.nn.Module):  # the same weights twice add nothing but cost
        from bts.core.members import resolve_dir, weights_sha256

        digest = weights_sha256(resolve_dir(str(new_expert), "new expert"))
        twin = next((m["name"] for m in model.config.members if m.get("sha256") == digest), None)
        if twin is not None:
            raise BTSError(f"'{new_expert}' has the same weights as member '{twin}', which is already in this model.")
    new = _rebuild(model, [*model._expert_models, new_expert], [*names, name])
    n = len(names)
    for old_layer, new_layer in zip(model.stitches, new.stitches):
        if new_layer.kind == E2H:
            new_layer.enable_presence()
            with torch.no_grad():
                new_layer.presence[n + 1].zero_()  # the new member: exactly no mass until trained
        _transfer(old_layer, new_layer, [(i, i) for i in range(n)])
    return new


def remove_expert(model, name: str):
    """A model without expert `name`: its slices are dropped and E→H gates renormalise over the others."""
    r = _expert_index(model, name)
    names = list(model.config.expert_names)
    if len(names) == 1:
        raise BTSError(f"expert '{name}' is the only expert; a stitched model needs at least one.")
    keep = [i for i in range(len(names)) if i != r]
    new = _rebuild(model, [model._expert_models[i] for i in keep], [names[i] for i in keep])
    for old_layer, new_layer in zip(model.stitches, new.stitches):
        if old_layer.presence is not None:
            new_layer.enable_presence()
        _transfer(old_layer, new_layer, list(enumerate(keep)))
    return new


# ---- training after a change -----------------------------------------------------------------------------------
def _new_slot_masks(model, name: str) -> dict[str, torch.Tensor]:
    """For each stitch parameter with a slot of expert `name`: a 0/1 mask of that slot (shape of the parameter)."""
    e = _expert_index(model, name)
    masks = {}
    for i, layer in enumerate(model.stitches):
        params = dict(layer.named_parameters())
        for key, (view, offset) in _member_views(layer).items():
            mask = torch.zeros_like(view)
            mask[e + offset] = 1
            masks[f"stitches.{i}.{key}"] = mask.view_as(params[key])
    return masks


def train_stitches(model, batches, cfg, out_dir, *, only: str | None = None, desc: str = "stitch", seed: int = 0):
    """bts.train.train over the stitch parameters: all of them, or with only=<expert name> just that expert's
    slots (the other entries get zero gradients and are restored after every step, so even weight decay cannot
    move them). E→H presence weights are projected to ≥ 0 after every step."""
    from bts.train.loop import train

    params = {f"stitches.{k}": p for k, p in model.stitches.named_parameters()}
    masks = _new_slot_masks(model, only) if only is not None else {}
    trainable = {k: p for k, p in params.items() if only is None or k in masks}
    frozen = {k: (params[k], masks[k].bool(), params[k].detach().clone()) for k in masks}
    handles = [params[k].register_hook(lambda g, m=m: g * m) for k, m in masks.items()]

    @torch.no_grad()
    def project(_step=None):
        for p, mask, original in frozen.values():
            p.copy_(torch.where(mask, p, original))
        for layer in model.stitches:
            if layer.presence is not None:
                layer.presence.clamp_(min=0)

    try:  # step_hook runs before each step's forward, so it projects the previous step's update
        result = train(model, trainable, batches, cfg, out_dir, desc=desc, seed=seed, step_hook=project)
    finally:
        for h in handles:
            h.remove()
    project()
    return result


def stitch_mix_for(run, experts: list[str], focus: str | None = None, focus_weight: float = 0.5) -> dict:
    """The run's stitch datamix (general_weight over every domain, the rest over the experts' domains) for this
    set of experts; with `focus`, that domain gets focus_weight of the mix on top (what an added expert trains on)."""
    if not 0 <= focus_weight < 1:
        raise BTSError(f"focus_weight must be in [0, 1) (got {focus_weight}).")
    if focus is not None and focus not in run.domains:
        raise BTSError(f"domain '{focus}' is not in the run's data (domains: {', '.join(run.domains)}).")
    general = run.recipe.stitch.general_weight
    mix = {d: general / len(run.domains) for d in run.domains}
    own = [e for e in experts if e in run.domains]
    for d in own:
        mix[d] += (1 - general) / len(own)
    if not own:  # experts named unlike any domain: the general mix alone
        mix = {d: 1 / len(run.domains) for d in run.domains}
    if focus is not None:
        mix = {d: (1 - focus_weight) * w for d, w in mix.items()}
        mix[focus] += focus_weight
    return mix


def train_config(run, steps: int):
    """The run's stitch training settings for a shorter phase (warm-up scaled down with it)."""
    cfg = run.recipe.stitch.train
    if steps < 1:
        raise BTSError(f"steps must be at least 1 (got {steps}).")
    warmup = max(1, min(cfg.warmup, math.ceil(cfg.warmup * steps / cfg.steps)))
    return dataclasses.replace(cfg, steps=steps, warmup=warmup, ckpt_every=max(steps, 1))


# ---- gate analysis -------------------------------------------------------------------------------------------
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
            gates = model.gate_values(w[i:i + batch_size], effective=True)
            mass = torch.stack([gates[j].mean(-1).sum((0, 1)) for j in e2h])  # [layers, members]
            sums = mass if sums is None else sums + mass
            count += w[i:i + batch_size].shape[:2].numel()
        mean = (sums / count).tolist()
        table[domain] = {f"after block {model.config.stitch_positions[j]}": dict(zip(names, map(float, row)))
                         for j, row in zip(e2h, mean)}
    return table


# ---- domain switches and sparse inference ---------------------------------------------------------------------
def _dominant(model, ids: torch.Tensor) -> torch.Tensor:
    """Per token, the index of the expert with the most mixing weight at the last E→H stitch ([B, T]). The hub is
    left out: it carries most of the mass everywhere, so the question is which expert leads."""
    last = max(i for i, k in enumerate(model.config.stitch_kinds) if k == E2H)
    return model.gate_values(ids, effective=True)[last].mean(-1)[..., 1:].argmax(-1)


def switch_text(run, domains: list[str] | None = None) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """Held-out text that changes domain every half window (the report's gate heatmap): ids, [(start, domain)]."""
    chunk = run.recipe.data.seq_len // 2
    pieces, bounds = [], []
    for d in (domains or run.domains)[:4]:
        bounds.append((sum(len(p) for p in pieces), d))
        pieces.append(run.stream(d, "heldout")[:chunk])
    return torch.cat(pieces), bounds


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
            dom = _dominant(model, ids)
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
    dom = _dominant(model, ids.view(1, -1))[0]
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
                chosen = model.top_experts(probe, k)
                model.set_active_experts(chosen)
                loss = heldout_loss(model, scored)
                rows.append({"k": k, "experts": chosen, "loss": loss, "change_pct": 100 * (loss / full - 1)})
            table[d] = {"full": full, "windows": len(scored), "k": rows}
    finally:
        model.set_active_experts(None)
    return table


# ---- the measurement of docs/modularity.md -------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"bts modularity: {msg}", file=sys.stderr, flush=True)


@contextmanager
def _single_process():
    """Train as one process even under torchrun: the pipeline runs this stage on rank 0 alone while the other
    ranks wait, so bts.train.loop must not wait for them in a collective."""
    from bts.train import distributed

    saved = distributed.active
    distributed.active = lambda: False
    try:
        yield
    finally:
        distributed.active = saved


def measure_modularity(run, *, add_fraction: float = 0.25, retrain_fraction: float = 0.25,
                       focus_weight: float = 0.5, sparse: bool = True, out: str | Path | None = None) -> dict:
    """On a finished run (seed, experts and stitch stages done):
    (a) stitch all experts but the last from scratch (the recipe's full stitch steps), add the last one with
        add_fraction of those steps (new slots only, and all stitch parameters) and compare with the model
        stitched from scratch with every expert (the run's models/bts);
    (b) remove each expert from that model: every domain's held-out loss, then after retrain_fraction of the
        steps of retraining all stitch parameters;
    (c) the removed expert's own domain against the seed's loss there;
    plus the gates per domain, whether the dominant expert switches where the text changes domain, and (sparse)
    the held-out loss with only the top-k experts active for k = 1..n.
    Training phases resume from their checkpoints under <out>/train, so an interrupted measurement with the same
    settings resumes exactly; results.json is written atomically at the end."""
    from bts.data.streams import eval_windows
    from bts.core.model import BTSForCausalLM

    out = Path(out) if out else run.path("modularity")
    experts = list(run.recipe.expert_domains)
    if len(experts) < 2:
        raise BTSError(f"the modularity measurement needs at least 2 experts (the run has {experts}).")
    if not run.done("stitch"):
        raise BTSError(f"run '{run.root}' has no finished stitch stage; run it first.")
    seq, budget = run.recipe.data.seq_len, run.recipe.data.eval_tokens
    windows = {d: eval_windows(run.stream(d, "heldout"), seq, budget) for d in run.domains}
    full_steps = run.recipe.stitch.train.steps

    def losses(model) -> dict:
        result = {d: heldout_loss(model, w) for d, w in windows.items()}
        return {**result, "avg": sum(result.values()) / len(result)}

    def batches(mix, salt):
        return run.batcher(mix, run.recipe.stitch.train, salt=salt)

    results = {"schema": "bts.pipeline.modularity/1", "experts": experts, "full_stitch_steps": full_steps,
               "settings": {"add_fraction": add_fraction, "retrain_fraction": retrain_fraction,
                            "focus_weight": focus_weight, "sparse": sparse, "heldout_tokens": budget}}
    from transformers import AutoModelForCausalLM

    seed = AutoModelForCausalLM.from_pretrained(run.path("models", "seed"), dtype=torch.float32).eval()
    results["seed"] = losses(seed)
    del seed
    full = BTSForCausalLM.from_pretrained(run.path("models", "bts")).eval()
    results["full"] = losses(full)
    results["gates"] = gate_table(full, {d: w[:8] for d, w in windows.items()})
    ids, bounds = switch_text(run)
    results["switch"] = {**switch_table(full, {d: run.stream(d, "heldout") for d in run.domains}, seq // 2),
                         "heatmap_text": segment_dominance(full, ids, bounds)}
    _log(f"full model avg {results['full']['avg']:.4f}, seed avg {results['seed']['avg']:.4f}")
    if sparse:
        results["sparse"] = sparse_table(full, windows)
        _log("sparse inference scored for k = 1.." + str(len(experts)))

    with _single_process():
        _add_and_remove(run, results, full, experts, losses, batches, out, add_fraction, retrain_fraction,
                        focus_weight)
    from bts.atomic import atomic_write_json

    atomic_write_json(out / "results.json", results)
    return results


def _add_and_remove(run, results, full, experts, losses, batches, out, add_fraction, retrain_fraction,
                    focus_weight) -> None:
    full_steps = results["full_stitch_steps"]
    # (a) add the last expert to a model stitched without it
    last, rest = experts[-1], experts[:-1]
    add_steps = max(1, round(add_fraction * full_steps))
    base = run.build_stitched()
    base = remove_expert(base, last)  # same layout as the full run, fresh stitches over the other experts
    train_stitches(base, batches(stitch_mix_for(run, rest), 7), run.recipe.stitch.train,
                   out / "train" / f"without-{last}", desc=f"stitch without {last}", seed=run.recipe.seed)
    add = {"expert": last, "steps": add_steps, "without": losses(base)}
    expert_dir = str(run.path("models", f"expert-{last}"))
    for mode in ("new", "all"):
        grown = add_expert(base, expert_dir, name=last)
        # the exactness check on real text: the grown model before training scores what the smaller one did
        add["init_avg_loss_diff"] = abs(losses(grown)["avg"] - add["without"]["avg"])
        train_stitches(grown, batches(stitch_mix_for(run, experts, focus=last, focus_weight=focus_weight), 11),
                       train_config(run, add_steps), out / "train" / f"add-{last}-{mode}",
                       only=last if mode == "new" else None, desc=f"add {last} ({mode})", seed=run.recipe.seed)
        add[f"added_{mode}"] = losses(grown)
        _log(f"add {last} ({mode}, {add_steps} steps): avg {add[f'added_{mode}']['avg']:.4f}")
    results["add"] = add
    del base, grown

    # (b), (c) remove each expert, with and without retraining
    retrain_steps = max(1, round(retrain_fraction * full_steps))
    results["remove"] = {}
    for name in experts:
        reduced = remove_expert(full, name)
        entry = {"removed": losses(reduced)}
        others = [e for e in experts if e != name]
        train_stitches(reduced, batches(stitch_mix_for(run, others), 13), train_config(run, retrain_steps),
                       out / "train" / f"remove-{name}", desc=f"retrain without {name}", seed=run.recipe.seed)
        entry["retrained"] = losses(reduced)
        entry["retrain_steps"] = retrain_steps
        results["remove"][name] = entry
        _log(f"remove {name}: own domain {results['full'].get(name, float('nan')):.4f} -> "
             f"{entry['removed'].get(name, float('nan')):.4f} (seed {results['seed'].get(name, float('nan')):.4f})")
        del reduced


def main(argv: list[str] | None = None) -> int:
    """python -m bts.pipeline.modularity RUN_DIR: run measure_modularity on a finished run and print its tables (what the
    pipeline's modularity stage does, with the results elsewhere when --out is given)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bts.pipeline.modularity", description=measure_modularity.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--add-fraction", type=float, default=0.25)
    p.add_argument("--retrain-fraction", type=float, default=0.25)
    p.add_argument("--focus-weight", type=float, default=0.5)
    p.add_argument("--no-sparse", action="store_true", help="skip the sparse-inference losses")
    p.add_argument("--out", help="where results and training logs go (default: RUN_DIR/modularity)")
    args = p.parse_args(argv)
    try:
        run = load_run(args.run_dir)
        results = measure_modularity(run, add_fraction=args.add_fraction, retrain_fraction=args.retrain_fraction,
                                     focus_weight=args.focus_weight, sparse=not args.no_sparse, out=args.out)
    except BTSError as exc:
        print(f"bts: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_tables(results))
    return 0


def load_run(run_dir):
    """A finished pipeline run (its resolved recipe.yaml and data) as a bts.pipeline.Run."""
    from bts.pipeline.run import Run
    from bts.pipeline.recipe import load_recipe

    root = Path(run_dir)
    if not (root / "recipe.yaml").exists():
        raise BTSError(f"--run-dir '{root}' is not a bts run directory (no recipe.yaml).")
    return Run(load_recipe(str(root / "recipe.yaml")), root)


def markdown_tables(results: dict) -> str:
    """The measurement as the report's Modularity sections, in markdown (held-out loss, nats/token)."""
    from bts.report import GATES_TITLE, gate_markdown, gate_sentence, modularity_sections

    gates = [(GATES_TITLE, gate_markdown(results["gates"]) + "\n\n" + gate_sentence(results["gates"]))]
    return "\n\n".join(f"## {title}\n\n{body}" for title, body in modularity_sections(results, gates)) + "\n"


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_expert", "remove_expert", "train_stitches", "stitch_mix_for", "train_config", "gate_table",
           "measure_modularity", "load_run", "markdown_tables"]
