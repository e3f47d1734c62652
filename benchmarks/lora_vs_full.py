"""LoRA experts against fully trained ones, on finished runs' expert stages (docs/lora.md has the figures).

    python benchmarks/lora_vs_full.py full=/tmp/lora/full lora-r8=/tmp/lora/r8 [--split val|heldout]

Each run directory holds the same data, tokenizer and seed (copy them from the first run's, with their stage
markers) and its experts trained with one setting. For the seed and every expert it scores the split's loss
(nats/token, data.eval_tokens per domain) on every domain, and prints per run: the loss on the expert's own domain
and on the others (both also as the change from the seed: specialisation and forgetting), the trained parameters
and the expert stage's wall time. Writes <first run>/lora_vs_full-<split>.json.

    python benchmarks/lora_vs_full.py full=/tmp/lora/full --time-steps 10 [--rank 8]

instead times training steps of a full expert and of a LoRA expert side by side on the first run's seed
(alternating rounds, so both see the same machine load) and prints the median ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bts.data.streams import eval_windows
from bts.eval.heldout import heldout_loss
from bts.pipeline.loaders import load_hf, quiet_libraries
from bts.pipeline.run import load_run


def score(run, model_dir: Path, split: str) -> dict:
    model, _ = load_hf(model_dir)
    seq, budget = run.recipe.data.seq_len, run.recipe.data.eval_tokens
    return {d: heldout_loss(model, eval_windows(run.stream(d, split), seq, budget)) for d in run.domains}


def time_steps(run, steps: int, rank: int, rounds: int = 5) -> None:
    """Seconds per training step (forward, backward, AdamW) of a full and a LoRA expert, alternating rounds."""
    from bts.train import lora
    from bts.train.loop import make_optimizer

    cfg = run.recipe.experts.train
    batch = run.batcher({run.domains[0]: 1.0}, cfg, salt=100)(0)[0]

    def one_round(use_lora: bool) -> float:
        model, _ = load_hf(run.path("models", "seed"))
        trainable = dict(model.named_parameters())
        if use_lora:
            model, trainable = lora.add_adapters(model, r=rank, alpha=2.0 * rank, targets=lora.DEFAULT_TARGETS)
        model.train()
        opt = make_optimizer(trainable, cfg)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps

    full, low = [], []
    for _ in range(rounds):
        full.append(one_round(False))
        low.append(one_round(True))
    ratio = statistics.median(b / a for a, b in zip(full, low))
    print(f"step time, batch {cfg.batch_size} x {run.recipe.data.seq_len}: full {statistics.median(full):.3f} s, "
          f"LoRA r {rank} {statistics.median(low):.3f} s; LoRA / full = {ratio:.2f} (median of {rounds} rounds, "
          f"torch threads {torch.get_num_threads()})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    p.add_argument("--split", default="val", choices=["val", "heldout"])
    p.add_argument("--time-steps", type=int, default=0, help="time this many training steps per round instead")
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    runs = [tuple(item.split("=", 1)) for item in args.runs]
    first = load_run(runs[0][1])
    if args.time_steps:
        return time_steps(first, args.time_steps, args.rank)
    seed = score(first, first.path("models", "seed"), args.split)
    out = {"split": args.split, "seed": seed, "runs": {}}
    print(f"seed ({args.split}): " + ", ".join(f"{d} {v:.3f}" for d, v in seed.items()))
    print("| run | expert | own | Δ own vs seed | others (mean) | Δ others vs seed | trained params | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for label, path in runs:
        run = load_run(path)
        rows = {}
        for d in run.recipe.expert_domains:
            losses = score(run, run.path("models", f"expert-{d}"), args.split)
            marker = run.done(f"expert:{d}") or {}
            others = [x for x in run.domains if x != d]
            own, rest = losses[d], sum(losses[x] for x in others) / len(others)
            rest_seed = sum(seed[x] for x in others) / len(others)
            rows[d] = {"losses": losses, "own": own, "others": rest, "d_own": own - seed[d],
                       "d_others": rest - rest_seed, "trained_params": marker.get("trained_params"),
                       "wall_s": marker.get("wall_s"), "lr": (marker.get("budget") or {}).get("lr")}
            r = rows[d]
            print(f"| {label} | {d} | {own:.3f} | {r['d_own']:+.3f} | {rest:.3f} | {r['d_others']:+.3f} | "
                  f"{r['trained_params']:,} | {r['wall_s']:.0f} |")
        mean = {k: sum(r[k] for r in rows.values()) / len(rows) for k in ("own", "d_own", "others", "d_others")}
        print(f"| {label} | **mean** | {mean['own']:.3f} | {mean['d_own']:+.3f} | {mean['others']:.3f} | "
              f"{mean['d_others']:+.3f} | | {sum(r['wall_s'] for r in rows.values()):.0f} |")
        out["runs"][label] = {"dir": path, "experts": rows, "mean": mean}
    (Path(runs[0][1]) / f"lora_vs_full-{args.split}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    with quiet_libraries():
        main()
