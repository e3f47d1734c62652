"""The modularity measurement of docs/modularity.md on a finished pipeline run: grow and shrink the stitched model
(bts.core.surgery) and measure what that costs.

    bigger = add_expert(model, "models/expert-legal", name="legal")      # bts.core.surgery
    train_stitches(bigger, batches, cfg, "train/add-legal", only="legal") # short training of the new slots only
    results = measure_modularity(run)                                     # (a) add, (b) remove, (c) own domain

The pipeline's `modularity` stage runs measure_modularity (recipe section `modularity:`) and the report shows it
(bts.report.modularity_sections); `python -m bts.pipeline.modularity RUN_DIR` runs it by hand and prints the tables.
Gate tables, domain switches and sparse inference are bts.eval.gates.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from bts.core.surgery import add_expert, new_slot_masks, remove_expert
from bts.errors import BTSError
from bts.eval.gates import gate_table, segment_dominance, sparse_table, switch_table
from bts.eval.heldout import heldout_loss
from bts.pipeline.loaders import load_bts, load_hf, quiet_libraries
from bts.pipeline.rundata import load_run_data


# ---- training after a change -----------------------------------------------------------------------------------
def train_stitches(model, batches, cfg, out_dir, *, only: str | None = None, desc: str = "stitch", seed: int = 0):
    """bts.train.train over the stitch parameters: all of them, or with only=<expert name> just that expert's
    slots (the other entries get zero gradients and are restored after every step, so even weight decay cannot
    move them). E→H presence weights are projected to ≥ 0 after every step."""
    from bts.train.loop import train

    params = {f"stitches.{k}": p for k, p in model.stitches.named_parameters()}
    masks = new_slot_masks(model, only) if only is not None else {}
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
    """The run's stitch datamix (Run.stitch_mix: general_weight over every domain, the rest over the experts'
    domains, by stitch.domain_weights) for this set of experts; with `focus`, that domain gets focus_weight of the
    mix on top (what an added expert trains on)."""
    if not 0 <= focus_weight < 1:
        raise BTSError(f"focus_weight must be in [0, 1) (got {focus_weight}).")
    if focus is not None and focus not in run.domains:
        raise BTSError(f"domain '{focus}' is not in the run's data (domains: {', '.join(run.domains)}).")
    mix = run.stitch_mix(experts)
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

    seed, _ = load_hf(run.model_dir("seed"), run.device, run.members_dtype)  # on the run's device
    results["seed"] = losses(seed)
    del seed
    full, _ = load_bts(run.model_dir("bts"), run.device, run.members_dtype)
    results["full"] = losses(full)
    results["gates"] = gate_table(full, {d: w[:8] for d, w in windows.items()})
    ids, bounds = run.switch_text()
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
    expert_dir = str(run.model_dir(f"expert-{last}"))
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
        run = load_run_data(args.run_dir)
        with quiet_libraries():
            results = measure_modularity(run, add_fraction=args.add_fraction, retrain_fraction=args.retrain_fraction,
                                         focus_weight=args.focus_weight, sparse=not args.no_sparse, out=args.out)
    except BTSError as exc:
        print(f"bts: error: {exc}", file=sys.stderr)
        return 2
    print(markdown_tables(results))
    return 0


def markdown_tables(results: dict) -> str:
    """The measurement as the report's Modularity sections, in markdown (held-out loss, nats/token)."""
    from bts.report import GATES_TITLE, gate_markdown, gate_sentence, modularity_sections

    gates = [(GATES_TITLE, gate_markdown(results["gates"]) + "\n\n" + gate_sentence(results["gates"]))]
    return "\n\n".join(f"## {title}\n\n{body}" for title, body in modularity_sections(results, gates)) + "\n"


load_run = load_run_data  # the name before the split (bts.modularity.load_run); the pipeline's is bts.pipeline.run


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_expert", "remove_expert", "train_stitches", "stitch_mix_for", "train_config", "measure_modularity",
           "load_run", "markdown_tables"]
