"""P3: cost of one stitch-training step against one stitched forward (CPU, one process, same batch).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_train.py [--threads 1] [--repeats 7] [--dtype bfloat16] [--checkpoint-members]

Numerator: one stitch-training step exactly as bts.train.loop runs it: model.train(); loss = model(ids, labels=ids).loss;
loss.backward(); clip_grad_norm_ over the stitch parameters; AdamW (bts.train.loop.make_optimizer, stitch parameters
only) .step(); zero_grad(set_to_none=True).
Denominator: the stitched forward on the same batch, in eval mode, under no_grad, use_cache=False (what
bench_model.py calls "forward").
The step is split into its forward with grad, backward, and optimizer parts so the reader sees where time goes.
Measurements are interleaved (forward, then step, per repeat) and summarised by medians.

Analytic expectation (printed): members are frozen, so backward through a member block computes activation
gradients only, no weight gradients: about 1× the block's forward for the projections (dX = dY·W) and 2× for the
attention matmuls. Blocks before the first stitch that changes their stream record no graph and get no backward:
the hub's stream changes first at the first E→H, an expert's at the first H→E (or at the first E→H with
expert_stream="projected"). So step/forward ≈ 1 + (FLOPs of member blocks with a graph + LM head + 2× stitches) /
forward FLOPs, plus elementwise backward and the optimizer, which FLOPs do not count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import add_model_arguments, make_members, stitch_flops_per_token  # noqa: E402

from bts import BTSForCausalLM  # noqa: E402
from bts.train.config import TrainConfig  # noqa: E402
from bts.core.stitch import E2H, H2E  # noqa: E402
from bts.train.loop import make_optimizer  # noqa: E402

TARGET = 2.3


def block_flops(cfg, ctx: int) -> tuple[float, float]:
    """Forward FLOPs per token of one decoder block: (projections + MLP, attention matmuls), as bench_model counts."""
    d, ff = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    return 2 * (2 * d * d + 2 * d * kv + 3 * d * ff), 2 * 2 * (ctx / 2) * d


def graph_layout(model: BTSForCausalLM) -> dict:
    """Which member blocks run, and which of them record an autograd graph (1-indexed block counts)."""
    kinds, positions = model.config.stitch_kinds, model.config.stitch_positions
    layers = model.config.base_config.num_hidden_layers
    e2h = [p for p, k in zip(positions, kinds) if k == E2H]
    h2e = [p for p, k in zip(positions, kinds) if k == H2E]
    expert_changes = h2e + (e2h if model.config.expert_stream == "projected" else [])
    expert_runs = max(e2h) if e2h else 0  # expert blocks after the last E→H are skipped
    hub_from = min(e2h) if e2h else layers  # hub blocks after this one have a graph
    expert_from = min(expert_changes) if expert_changes else expert_runs
    return {"layers": layers, "n": model.config.num_experts, "hub_graph": max(0, layers - hub_from),
            "expert_runs": expert_runs, "expert_graph": max(0, expert_runs - expert_from)}


def expected_step_ratio(model: BTSForCausalLM, ctx: int) -> dict:
    """FLOP model of step / forward (see the module docstring)."""
    cfg = model.hub.config
    lay = graph_layout(model)
    lin, attn = block_flops(cfg, ctx)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    stitch = stitch_flops_per_token(model)
    runs = lay["layers"] + lay["n"] * lay["expert_runs"]
    graph = lay["hub_graph"] + lay["n"] * lay["expert_graph"]
    forward = runs * (lin + attn) + head + stitch
    backward = graph * (lin + 2 * attn) + head + 2 * stitch
    if getattr(model, "execution", {}).get("checkpoint_members"):
        backward += graph * (lin + attn)  # the checkpointed blocks' forward runs again in backward
    return {"forward": forward, "backward": backward, "ratio": (forward + backward) / forward,
            "graph_blocks": graph, "run_blocks": runs, "graph_fraction": graph / runs, **lay}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_step(model: BTSForCausalLM, ids: torch.Tensor, repeats: int, verbose: bool = True) -> dict:
    """Median times (s) of the no-grad forward and of a stitch-training step and its parts; ratios to the forward."""
    trainable = dict(model.stitches.named_parameters())
    optimizer = make_optimizer(trainable, TrainConfig(lr=1e-3))
    params = list(trainable.values())

    def forward():
        model.eval()
        with torch.no_grad():
            model(ids, use_cache=False)

    def step() -> tuple[float, float, float]:
        model.train()
        t0 = time.perf_counter()
        loss = model(ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    forward(), step()  # warm-up (the first step also allocates Adam's moments)
    fwd, parts = [], []
    for _ in range(repeats):
        fwd.append(timed(forward))
        parts.append(step())
    model.eval()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    out = {"forward": med(fwd), "step": med([sum(p) for p in parts]), "forward_grad": med([p[0] for p in parts]),
           "backward": med([p[1] for p in parts]), "optimizer": med([p[2] for p in parts])}
    out.update({f"{k}_over_forward": out[k] / out["forward"]
                for k in ("step", "forward_grad", "backward", "optimizer")})
    if verbose:
        ms = lambda k: f"{out[k] * 1e3:.1f} ms"  # noqa: E731
        print(f"forward (no grad) {tuple(ids.shape)}: {ms('forward')}")
        print(f"training step: {ms('step')} = forward with grad {ms('forward_grad')} + backward {ms('backward')} "
              f"+ clip/AdamW/zero_grad {ms('optimizer')}")
        print(f"  / forward: step {out['step_over_forward']:.3f} = {out['forward_grad_over_forward']:.3f} + "
              f"{out['backward_over_forward']:.3f} + {out['optimizer_over_forward']:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    add_model_arguments(ap)
    ap.add_argument("--stitches", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="members' dtype")
    ap.add_argument("--checkpoint-members", action="store_true",
                    help="recompute member blocks in backward instead of keeping their activations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    members = make_members(args.experts, args.hidden, args.layers, args.vocab, ff=int(8 * args.hidden / 3) // 64 * 64)
    members = [m.to(getattr(torch, args.dtype)) for m in members]  # as if loaded in that dtype; stitches stay fp32
    model = BTSForCausalLM.from_members(members[0], members[1:], num_stitches=args.stitches).eval()
    if args.checkpoint_members:
        model.set_execution(checkpoint_members=True)
    print(f"n={args.experts} experts, d={args.hidden}, L={args.layers}, stitches after "
          f"{model.config.stitch_positions} ({', '.join(model.config.stitch_kinds)}), members {args.dtype}, "
          f"threads={args.threads}{', member blocks checkpointed' if args.checkpoint_members else ''}")
    exp = expected_step_ratio(model, args.seq)
    print(f"autograd graph: hub blocks {exp['hub_graph']}/{exp['layers']}, each expert {exp['expert_graph']}/"
          f"{exp['expert_runs']} run ({exp['layers'] - exp['expert_runs']} skipped): {exp['graph_blocks']} of "
          f"{exp['run_blocks']} member blocks ({exp['graph_fraction']:.1%}) get a backward")
    print(f"  FLOPs/token: forward {exp['forward'] / 1e6:.2f} M, backward {exp['backward'] / 1e6:.2f} M "
          f"(activation grads only for members, weight grads for stitches) -> expected step/forward "
          f"~{exp['ratio']:.2f} + elementwise backward + optimizer")
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    out = bench_step(model, ids, args.repeats)
    print(f"KEY train_step_over_forward={out['step_over_forward']:.3f} target={TARGET} "
          f"expected_flops={exp['ratio']:.3f} forward_grad_over_forward={out['forward_grad_over_forward']:.3f} "
          f"backward_over_forward={out['backward_over_forward']:.3f} "
          f"optimizer_over_forward={out['optimizer_over_forward']:.3f} graph_fraction={exp['graph_fraction']:.3f}")


if __name__ == "__main__":
    main()
