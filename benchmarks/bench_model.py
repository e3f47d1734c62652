"""Overhead of the stitched model over running its members alone (CPU, one process, same inputs).

    python benchmarks/bench_model.py [--repeats 5]

1. Forward (use_cache=False, no grad) on one batch: time(BTS) / Σ time(member alone), next to the FLOP floor.
   The brief's floor is 1 + stitch FLOPs / members' FLOPs; BTS also skips n LM heads (only the hub's is used), so
   the exact analytic ratio BTS FLOPs / Σ members' FLOPs is printed too and is the fair target.
2. Greedy decode (batch 1, with cache): BTS tokens/s against the seed's tokens/s divided by n+1 (the cost of n+1
   members with zero overhead).
Both are measured for the two execution paths: "loop" (each member's Hugging Face layer in turn, the reference)
and "batched" (block i of every member as one batched matmul over stacked weights, bts.core.batched).
Measurements are interleaved (BTS, then each member, per repeat) and summarised by medians, so slow drifts of a
shared machine hit both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bts import BTSForCausalLM


def make_members(n: int, d: int, layers: int, vocab: int, ff: int):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                      num_attention_heads=d // 64, num_key_value_heads=d // 64, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    members = []
    for seed in range(n + 1):
        torch.manual_seed(seed)
        members.append(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval())
    return members


def member_flops_per_token(cfg, ctx: int, with_head: bool = True) -> float:
    """Forward FLOPs of one member per token: projections, SwiGLU MLP, causal attention (avg context ctx/2), head."""
    d, ff, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    linear = 2 * (2 * d * d + 2 * d * kv + 3 * d * ff)
    attention = 2 * 2 * (ctx / 2) * d  # QKᵀ and AV over half the context on average
    head = 2 * d * cfg.vocab_size if with_head else 0
    return layers * (linear + attention) + head


def stitch_flops_per_token(model: BTSForCausalLM) -> float:
    """Each stitch: gate d → (n+1)·d plus n projections d → d, i.e. 2·(2n+1)·d² (elementwise mixing ignored)."""
    return sum(2 * s.num_paper_params() for s in model.stitches)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def with_execution(model, batched: bool):
    model.set_execution("batched" if batched else "loop")
    return model


def bench_forward(model, members, ids, repeats, batched=False):
    n = len(members) - 1
    with torch.no_grad():
        run_bts = lambda: with_execution(model, batched)(ids, use_cache=False)  # noqa: E731
        runs = [lambda m=m: m(ids, use_cache=False) for m in members]
        run_bts(), [r() for r in runs]  # warm-up
        bts_t, member_t = [], [[] for _ in members]
        for _ in range(repeats):
            bts_t.append(timed(run_bts))
            for i, r in enumerate(runs):
                member_t[i].append(timed(r))
    bts_med = statistics.median(bts_t)
    sum_med = sum(statistics.median(t) for t in member_t)
    cfg, ctx = members[0].config, ids.shape[1]
    members_flops = (n + 1) * member_flops_per_token(cfg, ctx)
    stitch = stitch_flops_per_token(model)
    last_e2h = max(p for p, k in zip(model.config.stitch_positions, model.config.stitch_kinds) if k == "e2h")
    skipped = cfg.num_hidden_layers - last_e2h  # expert blocks after the last E→H are skipped
    per_block = (member_flops_per_token(cfg, ctx, with_head=False)) / cfg.num_hidden_layers
    bts_flops = (n + 1) * member_flops_per_token(cfg, ctx, with_head=False) - n * skipped * per_block \
        + 2 * cfg.hidden_size * cfg.vocab_size + stitch
    print(f"forward {tuple(ids.shape)}, {'batched' if batched else 'loop'}: BTS {bts_med * 1e3:.1f} ms, members alone "
          f"{' + '.join(f'{statistics.median(t) * 1e3:.1f}' for t in member_t)} = {sum_med * 1e3:.1f} ms")
    print(f"  FLOPs/token: members {members_flops / 1e6:.2f} M (n+1={n + 1}), stitches {stitch / 1e6:.2f} M, "
          f"BTS {bts_flops / 1e6:.2f} M (one LM head, {skipped} expert blocks skipped)")
    ratio = bts_med / sum_med
    floor_brief = 1 + stitch / members_flops
    floor_exact = bts_flops / members_flops
    print(f"  time ratio {ratio:.3f}; floor 1+stitch/members {floor_brief:.3f}; exact FLOP ratio {floor_exact:.3f}")
    return ratio, floor_brief, floor_exact


def bench_decode(model, hub, prompt, new_tokens, repeats) -> dict[str, float]:
    """Decode ratio of each member execution path; every repeat times loop, batched and the seed back to back."""
    n = model.config.num_experts
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
              pad_token_id=0)
    paths = ("loop", "batched")
    for path in paths:
        with_execution(model, path == "batched").generate(prompt, **kw)  # warm-up
    hub.generate(prompt, **kw)
    times = {key: [] for key in (*paths, "seed")}
    for _ in range(repeats):
        for path in paths:
            times[path].append(timed(lambda: with_execution(model, path == "batched").generate(prompt, **kw)))
        times["seed"].append(timed(lambda: hub.generate(prompt, **kw)))
    tps = {key: new_tokens / statistics.median(t) for key, t in times.items()}
    ratios = {path: tps[path] / (tps["seed"] / (n + 1)) for path in paths}
    print(f"decode batch 1, {new_tokens} tokens: seed {tps['seed']:.1f} tok/s, seed/(n+1) {tps['seed'] / (n + 1):.1f}; "
          + "; ".join(f"{p} {tps[p]:.1f} tok/s, ratio {ratios[p]:.3f}" for p in paths)
          + f"; batched/loop {tps['batched'] / tps['loop']:.2f}")
    return ratios


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The setup every benchmark shares: n experts of a d-wide, L-layer Llama, one batch, CPU threads."""
    for flag, default in (("--experts", 3), ("--hidden", 256), ("--layers", 8), ("--vocab", 2048), ("--batch", 8),
                          ("--seq", 256), ("--threads", 1)):
        ap.add_argument(flag, type=int, default=default, help=f"default {default}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    add_model_arguments(ap)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    members = make_members(args.experts, args.hidden, args.layers, args.vocab, ff=int(8 * args.hidden / 3) // 64 * 64)
    model = BTSForCausalLM.from_members(members[0], members[1:]).eval()
    print(f"n={args.experts} experts, d={args.hidden}, L={args.layers}, stitches after "
          f"{model.config.stitch_positions} ({', '.join(model.config.stitch_kinds)}), threads={args.threads}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen)
    fwd, floor_brief, floor_exact = bench_forward(model, members, ids, args.repeats, batched=False)
    fwd_b, _, _ = bench_forward(model, members, ids, args.repeats, batched=True)
    prompt = torch.randint(3, args.vocab, (1, 16), generator=gen)
    dec = bench_decode(model, members[0], prompt, args.new_tokens, args.repeats)
    print(f"KEY forward_ratio_loop={fwd:.3f} forward_ratio_batched={fwd_b:.3f} floor={floor_brief:.3f} "
          f"exact_flop_ratio={floor_exact:.3f} decode_ratio_loop={dec['loop']:.3f} "
          f"decode_ratio_batched={dec['batched']:.3f}")


if __name__ == "__main__":
    main()
