"""`bts plan CONFIG_OR_MODEL --experts N`: parameters, memory per device and FLOPs of every phase, from a config."""

import json
from dataclasses import asdict

from bts.core.plan import format_plan, make_plan

HELP = "plan a real-size run from a model config: parameters, per-device memory (DDP/FSDP2), FLOPs/token, fits?"


def add_arguments(p):
    p.add_argument("model", metavar="CONFIG_OR_MODEL", help="a model directory, its config.json, or a shipped shape: paper-2.7b, "
                   "llama-3.1-8b (no weights read)")
    p.add_argument("--experts", type=int, required=True, help="number of experts branched from the seed")
    p.add_argument("--gpus", type=int, default=8, help="devices per job (FSDP2 shards over them; default 8)")
    p.add_argument("--gpu-mem", type=float, default=80.0, metavar="GiB", help="memory per device (default 80)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per device per micro-step (default 1)")
    p.add_argument("--stitches", type=int, default=4, help="stitch layers K (default 4)")
    p.add_argument("--checkpoint-members", action="store_true",
                   help="stitch training with stitch.checkpoint_members (blocks and stitches keep only their inputs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args):
    plan = make_plan(args.model, experts=args.experts, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, seq=args.seq,
                     micro_batch=args.micro_batch, stitches=args.stitches,
                     checkpoint_members=args.checkpoint_members)
    if args.json:
        plan = {**plan, "arch": asdict(plan["arch"]), "phases": [asdict(p) for p in plan["phases"]]}
        print(json.dumps(plan, indent=1))
    else:
        print(format_plan(plan))
    return 0
