"""Ablations of the stitch design choices the paper leaves open, on a finished run's seed and experts.

    python benchmarks/ablate_stitch.py runs/demo [--steps 150] [--variants init=blend init=bias ...]

Each variant re-trains only the stitch layers (same data, steps, batch and seed as the run's stitch stage) with one
setting changed, then scores held-out loss per domain. Prints one row per variant and writes
<run>/ablations/ablations.json plus a loss-curve plot; docs/ablations.md records the figures we measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bts.core.calibrate import CALIBRATION_SALT, calibrate_from  # noqa: E402
from bts.data.streams import eval_windows  # noqa: E402
from bts.eval.heldout import heldout_loss  # noqa: E402
from bts.pipeline.run import Run  # noqa: E402
from bts.pipeline.recipe import load_recipe  # noqa: E402
from bts.train.loop import train  # noqa: E402

DEFAULT_VARIANTS = [
    "init=blend", "init=blend lr=0.01", "init=blend lr=0.03", "init=bias lr=0.01", "init=bias beta=2 lr=0.01",
    "init=mixturekit lr=0.01", "init=default lr=0.01",
    "expert_stream=raw lr=0.01", "gate_dropout=0.1 lr=0.01", "all_e2h=true lr=0.01",
]


def parse_variant(text: str) -> dict:
    out = {}
    for item in text.split():
        key, value = item.split("=", 1)
        out[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, help="stitch steps per variant (default: the run's)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    args = parser.parse_args()
    root = Path(args.run_dir)
    recipe = load_recipe(str(root / "recipe.yaml"))
    run = Run(recipe, root)
    seq = recipe.data.seq_len
    windows = {d: eval_windows(run.stream(d, "heldout"), seq, recipe.data.eval_tokens) for d in run.domains}
    results = {}
    out_dir = root / "ablations"
    for variant in args.variants:
        change = parse_variant(variant)
        lr = change.pop("lr", None)
        stitch = dataclasses.replace(recipe.stitch, **change)
        cfg = dataclasses.replace(stitch.train, steps=args.steps or stitch.train.steps, log_every=5,
                                  ckpt_every=10**9, **({"lr": lr} if lr else {}))
        run.recipe = dataclasses.replace(recipe, stitch=dataclasses.replace(stitch, train=cfg))
        model = run.build_stitched()
        if stitch.init == "lstsq":  # as the stitch stage: W_proj fitted on the stitch mix before training
            calibrate_from(model, run.batcher(run.stitch_mix(), cfg, salt=CALIBRATION_SALT), stitch.init_batches,
                           stitch.init_ridge)
        trainable = {k: p for k, p in model.stitches.named_parameters()}
        name = variant.replace(" ", ",")
        t0 = time.perf_counter()
        result = train(model, trainable, run.batcher(run.stitch_mix(), cfg, salt=7), cfg,
                       out_dir / name.replace("=", "-"), desc=name, seed=recipe.seed)
        losses = {d: heldout_loss(model, w) for d, w in windows.items()}
        results[name] = {"heldout_loss": losses, "avg": sum(losses.values()) / len(losses),
                         "curve": result.losses, "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{name:<22} avg held-out {results[name]['avg']:.4f}  " +
              "  ".join(f"{d} {v:.3f}" for d, v in losses.items()), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ablations.json").write_text(json.dumps(results, indent=1))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        steps, losses = zip(*r["curve"])
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, label=name)
    ax.set_xlabel("stitch step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "ablation_curves.png", dpi=110)
    seed_avg = None
    seed_eval = root / "eval" / "seed.json"
    if seed_eval.exists():
        seed_avg = json.loads(seed_eval.read_text())["avg_heldout_loss"]
    best = min(results, key=lambda k: results[k]["avg"])
    print(f"best: {best} avg {results[best]['avg']:.4f}" + (f" (seed {seed_avg:.4f})" if seed_avg else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
