"""`bts build --hub DIR --experts DIR... --out DIR`: build an (untrained) stitched model and save it."""

from pathlib import Path

from bts.cli.devices import add_device_arguments, device_of, members_dtype_of
from bts.errors import BTSError
from bts.core.heads import OUTPUTS
from bts.core.stitch import EXPERT_STREAMS, INITS

HELP = "build a stitched model from a hub and experts (HF dirs or cached hub ids) and save it"


def add_arguments(p):
    p.add_argument("--hub", required=True, help="the seed model: an HF directory or a cached hub id")
    p.add_argument("--experts", required=True, nargs="+", help="expert models branched from the hub")
    p.add_argument("--names", nargs="+", help="expert names (default: directory names)")
    p.add_argument("--out", required=True, help="output directory (must be empty or new)")
    p.add_argument("--num-stitches", type=int, default=4, help="K stitch layers, evenly spaced (default 4)")
    p.add_argument("--positions", help="explicit 1-indexed blocks after which to stitch, e.g. 5,10,15,20")
    p.add_argument("--all-e2h", action="store_true", help="make every stitch experts→hub (the paper's ablation)")
    p.add_argument("--init", choices=[i for i in INITS if i != "lstsq"], default="blend")  # lstsq needs data
    p.add_argument("--beta", type=float, default=8.0, help="gate bias for --init bias")
    p.add_argument("--gate-dropout", type=float, default=0.0)
    p.add_argument("--expert-stream", choices=EXPERT_STREAMS, default="raw")
    p.add_argument("--output", choices=OUTPUTS, default="hub", dest="stitch_output",
                   help="hub: the hub's norm and head (the paper); mix_hidden / mix_logprobs: also the experts'")
    p.add_argument("--export", action="store_true", help="copy the members in: one self-contained directory")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    add_device_arguments(p)


def parse_positions(text):
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BTSError(f"--positions must be comma-separated integers (got '{text}').") from None


def run(args):
    from bts.core.model import BTSForCausalLM

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise BTSError(f"--out '{out}' is not empty; choose a new directory or pass --force.")
    device = device_of(args)
    model = BTSForCausalLM.from_members(
        args.hub, args.experts, names=args.names, num_stitches=args.num_stitches,
        positions=parse_positions(args.positions), all_e2h=args.all_e2h, init=args.init, beta=args.beta,
        gate_dropout=args.gate_dropout, expert_stream=args.expert_stream, output=args.stitch_output,
        dtype=members_dtype_of(args, device), device=device)
    model.save_pretrained(out, export_members=args.export)
    hub_dir = model.config.members[0]["path"]
    if hub_dir:
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(hub_dir).save_pretrained(out)
        except (OSError, ValueError):
            pass  # a hub without tokenizer files: the stitched model has none either
    n_stitch = sum(p.numel() for p in model.stitch_parameters())
    print(f"saved {out}: {len(args.experts)} experts, stitches after blocks {model.config.stitch_positions} "
          f"({', '.join(model.config.stitch_kinds)}), {n_stitch:,} trainable parameters")
    return 0
