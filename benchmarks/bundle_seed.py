"""Ship a pretrained seed with bts: copy a finished `seed` run's model into src/bts/seeds/<name> with its card.

    bts run seed --run-dir runs/seed --stages data,tokenizer,seed      # trains it (about 30 min on 2 cores)
    python benchmarks/bundle_seed.py runs/seed                          # -> src/bts/seeds/demo
    python benchmarks/bundle_seed.py runs/seed --check                  # the run's files equal the bundled ones?

The card (seed.json) records what the report's budget table and seed curve read: the recipe's data and training
settings, the tokens seen, the validation curve logged every `log_every` steps (seed_model.val_tokens), the final
validation loss per domain, the versions and thread count it was trained with, and the sha256 of every shipped
file. `--check` compares a second training run with the bundled files, byte for byte: on the same CPU kind, torch
version and thread count the seed recipe reproduces them exactly (CPU kernels and thread counts change float sums).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import yaml

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SEEDS = Path(__file__).resolve().parent.parent / "src" / "bts" / "seeds"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card(run: Path) -> dict:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    marker = json.loads((run / "stages" / "seed.json").read_text())
    train = recipe["seed_model"]["train"]
    curve = []
    for line in (run / "train" / "seed" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            curve.append({"step": rec["step"], "tokens": rec["tokens"], "train_loss": rec["loss"],
                          "val_avg": rec["val_avg"], "val_loss": rec["val_loss"]})
    env = json.loads((run / "env.json").read_text())
    shape = {k: recipe["seed_model"][k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                                                  "intermediate_size")}
    return {
        "recipe": recipe["name"], "reproduce": f"bts run {recipe['name']} --stages data,tokenizer,seed",
        "shape": shape, "vocab_size": recipe["tokenizer"]["vocab_size"],
        "data": {"domains": {d: s.get("max_chars") for d, s in recipe["data"]["domains"].items()},
                 "split_fractions": recipe["data"].get("split_fractions"),
                 "split_seed": recipe["data"].get("split_seed", 0), "seq_len": recipe["data"]["seq_len"],
                 "domain_weights": recipe["seed_model"].get("domain_weights", {})},
        "tokens": marker["tokens"], "steps": train["steps"], "batch_size": train["batch_size"],
        "seq_len": recipe["data"]["seq_len"], "lr": train["lr"], "warmup": train["warmup"],
        "min_lr_ratio": train["min_lr_ratio"], "final_lr": train["lr"] * train["min_lr_ratio"],
        "train_wall_s": marker.get("train_wall_s"), "final_train_loss": marker.get("final_loss"),
        "final_val_loss": curve[-1]["val_loss"] if curve else None, "curve": curve,
        "versions": env.get("versions"), "threads": env.get("threads"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished `bts run seed` directory")
    ap.add_argument("--name", default="demo", help="bundled name: the recipe then says seed_model.path: bundled:NAME")
    ap.add_argument("--check", action="store_true", help="compare the run's files with the bundled ones")
    args = ap.parse_args(argv)
    model = args.run_dir / "models" / "seed"
    if not (args.run_dir / "stages" / "seed.json").is_file() or not (model / "model.safetensors").is_file():
        print(f"bundle_seed: {args.run_dir} has no finished seed stage (stages/seed.json, models/seed).",
              file=sys.stderr)
        return 2
    out = SEEDS / args.name
    if args.check:
        bundled = json.loads((out / "seed.json").read_text())["sha256"]
        got = {f: sha256(model / f) for f in FILES}
        for f in FILES:
            print(f"{f}: {'identical' if got[f] == bundled[f] else 'DIFFERENT'} ({got[f][:16]})")
        return 0 if got == bundled else 1
    out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(model / f, out / f)
    info = card(args.run_dir)
    info["sha256"] = {f: sha256(out / f) for f in FILES}
    (out / "seed.json").write_text(json.dumps(info, indent=1) + "\n")
    size = sum((out / f).stat().st_size for f in FILES)
    print(f"bundled {model} -> {out} ({size / 1e6:.1f} MB); model.safetensors sha256 {info['sha256']['model.safetensors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
