"""Sparse inference: held-out loss and greedy decode speed when only the top-k experts run.

    python benchmarks/bench_sparse.py --run-dir runs/demo [--windows 16] [--new-tokens 64] [--repeats 3]
    python benchmarks/bench_sparse.py --synthetic --experts 3 --hidden 512 --layers 8     # speed only

With --run-dir (a finished run): for each domain, the experts are chosen from the gate mass on its first held-out
window (BTSForCausalLM.top_experts, all experts running), which is then left out of the scored windows; the loss of
k = 1..n active experts is set against the full model on the same windows. With --synthetic, the members are
random (speed does not depend on the weights), so larger, compute-bound sizes can be timed.

Decode: batch 1, a 64-token prompt, greedy with KV cache, forced to the full length; tokens/s is the median of the
repeats, interleaved over k and over both member execution paths (set_execution "loop" and "batched"), so a
drifting machine hits every variant alike. Speed-ups are against the full model on the same path. Not a timed
test: figures depend on the machine and its load. The last line is the summary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from bts import BTSForCausalLM
from bts.data.shards import Shard
from bts.data.streams import eval_windows
from bts.eval.heldout import heldout_loss

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import make_members  # noqa: E402

PATHS = ("loop", "batched")


def decode_tps(model, prompt, new_tokens):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
              pad_token_id=0)
    t0 = time.perf_counter()
    model.generate(prompt, **kw)
    return new_tokens / (time.perf_counter() - t0)


def loss_table(model, root: Path, windows: int) -> tuple[dict, list]:
    """Per domain: experts chosen for each k on the first window, and the loss change on the next windows."""
    seq = yaml.safe_load((root / "recipe.yaml").read_text())["data"]["seq_len"]
    names = list(model.config.expert_names)
    rows = {k: [] for k in range(1, len(names) + 1)}
    prompts = []
    for d in names:
        path = root / "data" / d / "heldout.tokens"  # the token shard (bts.data.shards)
        if not (path / "meta.json").exists():
            continue
        w = eval_windows(Shard(path), seq)
        probe, scored = w[:1], w[1:1 + windows]
        model.set_active_experts(None)
        full = heldout_loss(model, scored)
        line = [f"{d:<6} full {full:.4f}"]
        for k in rows:
            chosen = model.top_experts(probe, k)
            model.set_active_experts(chosen)
            loss = heldout_loss(model, scored)
            rows[k].append((d, chosen, loss / full - 1))
            line.append(f"k={k} {chosen} {loss:.4f} ({100 * (loss / full - 1):+.2f}%)")
        print("  ".join(line))
        prompts.append((probe[:, :64], {k: model.top_experts(probe, k) for k in rows}))
    model.set_active_experts(None)
    return rows, prompts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="a finished run: loss and speed of its stitched model")
    ap.add_argument("--synthetic", action="store_true", help="random members: speed only, any size")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--windows", type=int, default=16, help="held-out windows scored per domain")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if bool(args.run_dir) == args.synthetic:
        ap.error("give exactly one of --run-dir or --synthetic")
    torch.set_num_threads(args.threads)
    if args.synthetic:
        members = make_members(args.experts, args.hidden, args.layers, 2048, ff=int(8 * args.hidden / 3) // 64 * 64)
        model = BTSForCausalLM.from_members(members[0], members[1:]).eval()
        prompt = torch.randint(3, 2048, (1, 64), generator=torch.Generator().manual_seed(0))
        names = list(model.config.expert_names)
        prompts, rows = [(prompt, {k: names[:k] for k in range(1, len(names) + 1)})], None
        print(f"synthetic: {args.experts} experts, d={args.hidden}, L={args.layers}, threads {args.threads}")
    else:
        root = Path(args.run_dir)
        model = BTSForCausalLM.from_pretrained(root / "models" / "bts").eval()
        print(f"model {root / 'models' / 'bts'}: experts {model.config.expert_names}, threads {args.threads}")
        rows, prompts = loss_table(model, root, args.windows)
    n = model.config.num_experts
    tps = {(path, k): [] for path in PATHS for k in range(1, n + 1)}
    for prompt, chosen in prompts:
        decode_tps(model, prompt, 4)  # warm-up
        for _ in range(args.repeats):
            for path in PATHS:
                model.set_execution(path)
                for k in range(1, n + 1):
                    model.set_active_experts(chosen[k] if k < n else None)
                    tps[path, k].append(decode_tps(model, prompt, args.new_tokens))
    model.set_active_experts(None)
    print("\n| active experts | mean loss change (in-domain) | worst domain | "
          + " | ".join(f"{p} tok/s | {p} speed-up" for p in PATHS) + " |")
    print("|---|---|---|" + "---|---|" * len(PATHS))
    speedups = {}
    for k in range(n, 0, -1):
        if rows:
            inc = [r[2] for r in rows[k]]
            loss = f"{100 * statistics.mean(inc):+.2f}% | {100 * max(inc):+.2f}%"
        else:
            loss = "– | –"
        cells = []
        for path in PATHS:
            med, full = statistics.median(tps[path, k]), statistics.median(tps[path, n])
            speedups[path, k] = med / full
            cells.append(f"{med:.1f} | {med / full:.2f}×")
        label = f"all {n} (full)" if k == n else str(k)
        print(f"| {label} | {loss} | " + " | ".join(cells) + " |")
    fastest = max(statistics.median(tps[p, 1]) for p in PATHS) / statistics.median(tps["loop", n])
    print(f"KEY k1_speedup loop={speedups['loop', 1]:.2f} batched={speedups['batched', 1]:.2f} "
          f"k1_batched_vs_full_loop={statistics.median(tps['batched', 1]) / statistics.median(tps['loop', n]):.2f} "
          f"best_k1_vs_full_loop={fastest:.2f}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
