"""`bts remove-expert STITCHED_DIR NAME --out DIR [--retrain-steps N --run-dir RUN]`.

The expert's stitch slots are dropped and E→H gates renormalise over the remaining members, so the result is usable
as it is; --retrain-steps trains every stitch parameter briefly on the run's stitch mix without that expert.
"""

from pathlib import Path

from bts.cli.devices import add_device_arguments, device_of, members_dtype_of
from bts.errors import BTSError

HELP = "remove an expert from a stitched model (gates renormalised), optionally retrain the stitches briefly"


def add_arguments(p):
    p.add_argument("stitched", help="a saved stitched model directory")
    p.add_argument("name", help="the expert to remove")
    p.add_argument("--out", required=True, help="output directory (must be empty or new)")
    p.add_argument("--retrain-steps", type=int, default=0, help="stitch training steps afterwards (default 0)")
    p.add_argument("--run-dir", help="a pipeline run whose data streams and stitch mix retrain the stitches")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    add_device_arguments(p)


def run(args):
    from bts.cli.commands.add_expert import check_out, save
    from bts.core.model import BTSForCausalLM
    from bts.core.surgery import remove_expert
    from bts.pipeline.modularity import stitch_mix_for, train_config, train_stitches
    from bts.pipeline.run import load_run

    out = Path(args.out)
    check_out(out, args.force)
    if args.retrain_steps < 0:
        raise BTSError(f"--retrain-steps must be 0 or more (got {args.retrain_steps}).")
    if args.retrain_steps and not args.run_dir:
        raise BTSError(f"--retrain-steps {args.retrain_steps} needs training data: pass --run-dir of a pipeline run.")
    device = device_of(args)
    dtype = members_dtype_of(args, device)
    run_ = load_run(args.run_dir) if args.run_dir else None
    reduced = remove_expert(BTSForCausalLM.from_pretrained(args.stitched, dtype=dtype, device_map=device), args.name)
    if args.retrain_steps:
        mix = stitch_mix_for(run_, list(reduced.config.expert_names))
        result = train_stitches(reduced, run_.batcher(mix, run_.recipe.stitch.train, salt=13),
                                train_config(run_, args.retrain_steps), out / "train", desc=f"retrain without {args.name}",
                                seed=run_.recipe.seed)
        print(f"retrained the stitches for {args.retrain_steps} steps: mean loss of the last steps {result.final_loss:.4f}")
    save(reduced, args.stitched, out)
    print(f"saved {out}: experts {', '.join(reduced.config.expert_names)}")
    return 0
