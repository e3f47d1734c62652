"""Sparse inference: held-out loss and greedy decode speed when only the top-k experts run.

    python benchmarks/bench_sparse.py [--run-dir /tmp/demo1] [--windows 16] [--new-tokens 64] [--repeats 3]

For each domain of a finished run, the experts are chosen per domain from the gate mass on its first held-out window
(BTSForCausalLM.top_experts, all experts running), which is then left out of the scored windows; the loss of
k = 1..n active experts is set against the full model on the same windows. Decode: batch 1, a 64-token prompt of
that domain, greedy with KV cache, forced to the full length; tokens/s is the median of the repeats, interleaved
over k so a drifting machine hits every k alike. Not a timed test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from bts import BTSForCausalLM
from bts.data import eval_windows, heldout_loss


def decode_tps(model, prompt, new_tokens):
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="/tmp/demo1")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows scored per domain")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(args.run_dir)
    model = BTSForCausalLM.from_pretrained(root / "models" / "bts").eval()
    seq = yaml.safe_load((root / "recipe.yaml").read_text())["data"]["seq_len"]
    names = list(model.config.expert_names)
    n = len(names)
    domains = [d for d in names if (root / "data" / d / "heldout.tokens.pt").exists()]
    print(f"model {root / 'models' / 'bts'}: {n} experts {names}; threads {torch.get_num_threads()}")
    rows = {k: {"loss_inc": [], "tps": []} for k in range(1, n + 1)}
    full_tps = []
    for d in domains:
        w = eval_windows(torch.load(root / "data" / d / "heldout.tokens.pt", weights_only=True), seq)
        probe, scored = w[:1], w[1:1 + args.windows]
        model.set_active_experts(None)
        full = heldout_loss(model, scored)
        chosen = {k: model.top_experts(probe, k) for k in range(1, n + 1)}
        line = [f"{d:<6} full {full:.4f}"]
        for k in range(1, n + 1):
            model.set_active_experts(chosen[k])
            loss = heldout_loss(model, scored)
            rows[k]["loss_inc"].append(loss / full - 1)
            line.append(f"k={k} {chosen[k]} {loss:.4f} ({100 * (loss / full - 1):+.2f}%)")
        print("  ".join(line))
        prompt = probe[:, :64]
        model.set_active_experts(None)
        decode_tps(model, prompt, 4)  # warm-up
        for _ in range(args.repeats):
            model.set_active_experts(None)
            full_tps.append(decode_tps(model, prompt, args.new_tokens))
            for k in range(1, n + 1):
                model.set_active_experts(chosen[k])
                rows[k]["tps"].append(decode_tps(model, prompt, args.new_tokens))
    model.set_active_experts(None)
    base = statistics.median(full_tps)
    print(f"\n| active experts | mean loss change vs full (in-domain) | worst domain | decode tok/s | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| all {n} (full) | 0 | 0 | {base:.1f} | 1.00× |")
    for k, r in rows.items():
        tps = statistics.median(r["tps"])
        print(f"| {k} | {100 * statistics.mean(r['loss_inc']):+.2f}% | {100 * max(r['loss_inc']):+.2f}% | "
              f"{tps:.1f} | {tps / base:.2f}× |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    with torch.no_grad():
        main()
