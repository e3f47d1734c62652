"""`bts stitch --hub H --experts E1 E2 … --data FILE_OR_GLOB… --steps N --out DIR [key=value …]`: train stitch layers
over your own models on your text (bts.pipeline.stitch_job); re-running the same command resumes."""

import re

from bts.cli.devices import add_device_arguments

HELP = ("train stitch layers over your own hub and experts (HF dirs or cached hub ids) on your text and save the "
        "stitched model; the same command again resumes")
# key=value overrides end up in a greedy list (`--data a.txt stitch.init=blend`): they are moved back here
OVERRIDE = re.compile(r"(stitch|train|data|seed)(\.[A-Za-z_]\w*)*=.*")


def add_arguments(p):
    p.add_argument("--hub", required=True, help="the seed model the experts branched from: an HF dir or cached hub id")
    p.add_argument("--experts", required=True, nargs="+", help="expert models: HF dirs or cached hub ids")
    p.add_argument("--names", nargs="+", help="expert names (default: the folders' names)")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE_OR_GLOB",
                   help="text to train on: txt (one document per file), jsonl or parquet (data.text_field column)")
    p.add_argument("--data-hf", nargs="+", default=[], metavar="NAME[:CONFIG[:SPLIT]]",
                   help="Hugging Face datasets from the local cache (split default: train)")
    p.add_argument("--steps", required=True, type=int, help="optimizer steps (train.steps)")
    p.add_argument("--out", required=True, help="output directory: new, empty, or an earlier run of this command")
    add_device_arguments(p)
    p.add_argument("--export", action="store_true", help="copy the members into --out: one self-contained folder")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, starting training over")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="stitch.* (num_stitches, positions, init, …), train.* (lr, batch_size, grad_accum, warmup, "
                        "log_every, ckpt_every, dtype, …), data.seq_len, data.text_field, data.max_chars, "
                        "data.max_tokens, seed")


def run(args):
    from bts.pipeline.stitch_job import stitch_job

    overrides = list(args.overrides or [])
    lists = {}
    for name in ("experts", "names", "data", "data_hf"):
        items = getattr(args, name) or []
        lists[name] = [x for x in items if not OVERRIDE.fullmatch(x)]
        overrides += [x for x in items if OVERRIDE.fullmatch(x)]
    stitch_job(args.hub, lists["experts"], lists["data"], lists["data_hf"], steps=args.steps, out=args.out,
               overrides=overrides, names=lists["names"] or None, device=args.device or "auto",
               members_dtype=args.members_dtype or "auto", force=args.force,
               export=args.export)
    return 0
