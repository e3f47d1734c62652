"""Mean output-mix weight of each member per held-out domain for a finished run with stitch.output != hub
(docs/ablations.md), on the held-out windows the evaluate stage scores (data.eval_tokens per domain):
`python benchmarks/output_mix_weights.py RUN_DIR`."""

import sys

import torch

from bts.data.streams import eval_windows
from bts.pipeline.loaders import load_bts
from bts.pipeline.rundata import load_run_data

run = load_run_data(sys.argv[1])
model, _ = load_bts(run.model_dir("bts"))
names = [model.config.members[0]["name"], *model.config.expert_names]
seq = run.recipe.data.seq_len
print("| domain | " + " | ".join(names) + " |")
print("|---" * (len(names) + 1) + "|")
for domain in run.domains:
    windows = eval_windows(run.stream(domain, "heldout"), seq, run.recipe.data.eval_tokens)
    with torch.no_grad():  # [B, T, n+1, d or 1] per batch of 8 windows
        w = torch.cat([model(ids, return_gates=True)["output_gates"] for ids in windows.split(8)])
    mean = w.mean(dim=(0, 1, 3))
    print(f"| {domain} | " + " | ".join(f"{x:.3f}" for x in mean.tolist()) + " |")
