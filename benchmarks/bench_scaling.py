"""Scaling of P1 (forward), P2 (decode) and P3 (training step) with the number of experts and the sequence length.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_scaling.py [--threads 1] [--repeats 9]

A smaller model than bench_model.py's (d = 256, 4 layers, 4 stitches: H→E, E→H, H→E, E→H after blocks 1-4,
vocab 2,048, batch 4) so the whole sweep takes a few minutes on one core:
  n = 1, 2, 4, 8 experts at seq 256, and seq = 64, 128, 256, 512 at n = 3.
For each point, with the measurement functions of bench_model.py and bench_train.py (interleaved, medians):
  P1  forward time / Σ members' own forward times   (bench_model.bench_forward; dashed: exact FLOP ratio)
  P2  BTS decode tokens/s / (seed tokens/s / (n+1))  (bench_model.bench_decode: greedy, batch 1, 32 new tokens
      after a prompt of seq tokens, so the KV context grows with seq; the prompt's prefill is in both timings),
      with the members run one after another ("loop") and as one batched computation ("batched")
  P3  training step / no-grad forward                 (bench_train.bench_step; dashed: FLOP expectation)
Writes a plot (--out, default scaling.png in the current folder; the docs use --out docs/scaling.png) with two
panels, against n and against seq, and a JSON of every number next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import bench_decode, bench_forward, make_members, with_execution  # noqa: E402
from bench_train import TARGET as STEP_TARGET  # noqa: E402
from bench_train import bench_step, expected_step_ratio  # noqa: E402

from bts import BTSForCausalLM  # noqa: E402

DECODE_TARGET = 0.9


def measure(n: int, seq: int, args) -> dict:
    members = make_members(n, args.hidden, args.layers, args.vocab, ff=int(8 * args.hidden / 3) // 64 * 64)
    model = BTSForCausalLM.from_members(members[0], members[1:], num_stitches=args.stitches).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, seq), generator=gen)
    prompt = torch.randint(3, args.vocab, (1, seq), generator=gen)
    print(f"-- n={n}, seq={seq}")
    fwd, _, exact = bench_forward(model, members, ids, args.repeats)
    decode = bench_decode(model, members[0], prompt, args.new_tokens, args.repeats)
    dec, dec_batched = decode["loop"], decode["batched"]
    with_execution(model, False)  # training runs the members one after another (as "auto" does in training)
    step = bench_step(model, ids, args.repeats)
    expected = expected_step_ratio(model, seq)["ratio"]
    return {"n": n, "seq": seq, "forward_ratio": fwd, "exact_flop_ratio": exact, "decode_ratio": dec,
            "decode_ratio_batched": dec_batched,
            "step_over_forward": step["step_over_forward"], "expected_step_flops": expected,
            "backward_over_forward": step["backward_over_forward"],
            "forward_grad_over_forward": step["forward_grad_over_forward"]}


def plot(by_n: list[dict], by_seq: list[dict], out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    for ax, rows, key, label in ((axes[0], by_n, "n", f"experts n (seq {args.seq})"),
                                 (axes[1], by_seq, "seq", f"sequence length (n = {args.n_for_seq})")):
        x = [r[key] for r in rows]
        ax.plot(x, [r["forward_ratio"] for r in rows], "o-", color="C0", label="P1 forward / Σ members")
        ax.plot(x, [r["exact_flop_ratio"] for r in rows], "--", color="C0", alpha=0.6, label="P1 exact FLOP ratio")
        ax.plot(x, [r["decode_ratio"] for r in rows], "s-", color="C1", label="P2 decode / (seed/(n+1)), loop")
        if all("decode_ratio_batched" in r for r in rows):
            ax.plot(x, [r["decode_ratio_batched"] for r in rows], "D-", color="C3",
                    label="P2 decode, batched members")
        ax.axhline(DECODE_TARGET, color="C1", ls=":", alpha=0.6, label=f"P2 target ≥ {DECODE_TARGET}")
        ax.plot(x, [r["step_over_forward"] for r in rows], "^-", color="C2", label="P3 train step / forward")
        ax.plot(x, [r["expected_step_flops"] for r in rows], "--", color="C2", alpha=0.6, label="P3 FLOP expectation")
        ax.axhline(STEP_TARGET, color="C2", ls=":", alpha=0.6, label=f"P3 target ≤ {STEP_TARGET}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ratio")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    threads = f"{args.threads} thread" + ("s" if args.threads > 1 else "")
    fig.suptitle(f"Stitched-model overhead ratios (CPU, {threads}; d={args.hidden}, {args.layers} layers, "
                 f"{args.stitches} stitches, batch {args.batch})", fontsize=10)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--experts", default="1,2,4,8", help="n values (at --seq)")
    ap.add_argument("--seqs", default="64,128,256,512", help="sequence lengths (at --n-for-seq experts)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--n-for-seq", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--stitches", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("scaling.png"), help="the plot (default: %(default)s); the JSON goes next to it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ns = [int(x) for x in args.experts.split(",")]
    seqs = [int(x) for x in args.seqs.split(",")]
    cache: dict[tuple[int, int], dict] = {}
    for n, seq in [(n, args.seq) for n in ns] + [(args.n_for_seq, s) for s in seqs]:
        if (n, seq) not in cache:  # (n_for_seq, seq) appears in both sweeps: measured once
            cache[n, seq] = measure(n, seq, args)
    by_n = [cache[n, args.seq] for n in ns]
    by_seq = [cache[args.n_for_seq, s] for s in seqs]
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"setup": setup, "by_experts": by_n, "by_seq": by_seq}, indent=1) + "\n")
    plot(by_n, by_seq, args.out, args)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')} in {time.perf_counter() - start:.0f} s")
    print(f"{'':>10} {'P1 fwd':>7} {'exact':>6} {'P2 loop':>8} {'batched':>8} {'P3 step':>8} {'expect':>7}")
    for r in by_n + by_seq:
        print(f"n={r['n']} T={r['seq']:<4} {r['forward_ratio']:7.3f} {r['exact_flop_ratio']:6.3f} "
              f"{r['decode_ratio']:8.3f} {r['decode_ratio_batched']:8.3f} {r['step_over_forward']:8.3f} "
              f"{r['expected_step_flops']:7.3f}")
    fmt = lambda rows, k: ",".join(f"{r[k]:.2f}" for r in rows)  # noqa: E731
    print(f"KEY n={','.join(map(str, ns))} forward={fmt(by_n, 'forward_ratio')} decode={fmt(by_n, 'decode_ratio')} "
          f"decode_batched={fmt(by_n, 'decode_ratio_batched')} step={fmt(by_n, 'step_over_forward')} | "
          f"seq={','.join(map(str, seqs))} forward={fmt(by_seq, 'forward_ratio')} decode={fmt(by_seq, 'decode_ratio')} "
          f"decode_batched={fmt(by_seq, 'decode_ratio_batched')} step={fmt(by_seq, 'step_over_forward')}")


if __name__ == "__main__":
    main()
