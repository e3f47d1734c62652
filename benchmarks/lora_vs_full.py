"""LoRA experts against fully trained ones, on finished runs' expert stages (docs/lora.md has the figures).

    python benchmarks/lora_vs_full.py full=/tmp/lora/full lora-r8=/tmp/lora/r8 [--split val|heldout]

Each run directory holds the same data, tokenizer and seed (copy them from the first run's, with their stage
markers) and its experts trained with one setting. For the seed and every expert it scores the split's loss
(nats/token, data.eval_tokens per domain) on every domain, and prints per run: the loss on the expert's own domain
and on the others (both also as the change from the seed: specialisation and forgetting), the trained parameters
and the expert stage's wall time. Writes <first run>/lora_vs_full-<split>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bts.data.streams import eval_windows
from bts.eval.heldout import heldout_loss
from bts.pipeline.loaders import load_hf, quiet_libraries
from bts.pipeline.run import load_run


def score(run, model_dir: Path, split: str) -> dict:
    model, _ = load_hf(model_dir)
    seq, budget = run.recipe.data.seq_len, run.recipe.data.eval_tokens
    return {d: heldout_loss(model, eval_windows(run.stream(d, split), seq, budget)) for d in run.domains}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    p.add_argument("--split", default="val", choices=["val", "heldout"])
    args = p.parse_args()
    runs = [tuple(item.split("=", 1)) for item in args.runs]
    first = load_run(runs[0][1])
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
