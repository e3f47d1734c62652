"""`bts plan CONFIG_OR_MODEL --experts N` or `bts plan RECIPE`: parameters, memory per device and FLOPs of every
phase, from a config (or a recipe's hub and layout) alone."""

import json
from dataclasses import asdict
from pathlib import Path

from bts.core.plan import format_plan, make_plan
from bts.core.shipped import shipped_dir
from bts.errors import BTSError

HELP = "plan a real-size run from a model config or a recipe: parameters, per-device memory (DDP/FSDP2), FLOPs/token, fits?"


def add_arguments(p):
    p.add_argument("model", metavar="CONFIG_OR_MODEL_OR_RECIPE",
                   help="a model directory, its config.json, a shipped shape (paper-2.7b, llama-3.1-8b, qwen2.5-1.5b, "
                        "… or its hub id; no weights read), or a recipe (YAML or built-in name: its hub, experts, "
                        "seq_len, micro-batch and stitches)")
    p.add_argument("--experts", type=int, help="number of experts branched from the seed (a recipe gives its own)")
    p.add_argument("--gpus", type=int, help="devices per job (FSDP2 shards over them; default 8, a recipe 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GiB", help="memory per device (default 80)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per device per micro-step (default 1)")
    p.add_argument("--stitches", type=int, default=4, help="stitch layers K (default 4)")
    p.add_argument("--checkpoint-members", action="store_true",
                   help="stitch training with stitch.checkpoint_members (blocks and stitches keep only their inputs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def is_recipe(spec: str) -> bool:
    from bts.pipeline.recipe import builtin_recipes

    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        return True
    return not path.exists() and shipped_dir(spec) is None and spec in builtin_recipes()


def run(args):
    if is_recipe(args.model):
        from bts.pipeline.recipe import load_recipe
        from bts.pipeline.recipe_plan import recipe_plan

        plan = recipe_plan(load_recipe(args.model), gpus=args.gpus or 1, gpu_mem_gib=args.gpu_mem)
    else:
        if args.experts is None:
            raise BTSError(f"--experts is required when CONFIG_OR_MODEL '{args.model}' is not a recipe.")
        plan = make_plan(args.model, experts=args.experts, gpus=args.gpus or 8, gpu_mem_gib=args.gpu_mem,
                         seq=args.seq, micro_batch=args.micro_batch, stitches=args.stitches,
                         checkpoint_members=args.checkpoint_members)
    if args.json:
        plan = {**plan, "arch": asdict(plan["arch"]), "phases": [asdict(p) for p in plan["phases"]]}
        print(json.dumps(plan, indent=1))
    else:
        print(format_plan(plan))
    return 0
