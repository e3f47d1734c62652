"""`bts add-expert STITCHED_DIR NEW_EXPERT --out DIR [--run-dir RUN --steps N --train new|all]`.

The new expert joins with presence 0 in every E→H softmax, so the saved model first equals STITCHED_DIR exactly.
Training needs data: --run-dir names a pipeline run whose data streams and stitch mix are reused, with
--focus-weight of the mix on the new expert's domain (--domain, default: the expert's name). Without --run-dir the
model is saved untrained (equal to the input until trained).
"""

from pathlib import Path

from bts.cli.devices import add_device_arguments, device_of, members_dtype_of
from bts.errors import BTSError

HELP = "add an expert to a trained stitched model (exactly the same outputs at first), then train it briefly"


def add_arguments(p):
    p.add_argument("stitched", help="a saved stitched model directory")
    p.add_argument("expert", help="the new expert: a model directory branched from the same seed")
    p.add_argument("--out", required=True, help="output directory (must be empty or new); training logs and "
                   "checkpoints go to OUT/train")
    p.add_argument("--name", help="the new expert's name (default: the directory name)")
    p.add_argument("--run-dir", help="a pipeline run whose data streams and stitch mix train the new slots")
    p.add_argument("--domain", help="the run's domain of the new expert (default: its name)")
    p.add_argument("--steps", type=int, help="training steps (default: 25%% of the run's stitch steps; 0: none)")
    p.add_argument("--train", choices=("new", "all"), default="new",
                   help="train only the new expert's stitch slots (default) or every stitch parameter")
    p.add_argument("--focus-weight", type=float, default=0.5, help="share of the mix on the new domain (0.5)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    add_device_arguments(p)


def check_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise BTSError(f"--out '{out}' is not empty; choose a new directory or pass --force.")


def save(model, stitched_dir: str, out: Path) -> None:
    """Save the model and the input's tokenizer, when it has one."""
    model.save_pretrained(out)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(stitched_dir).save_pretrained(out)
    except (OSError, ValueError):
        pass  # no tokenizer files next to the stitched model: none to carry over


def run(args):
    from bts.core.model import BTSForCausalLM
    from bts.core.surgery import add_expert
    from bts.pipeline.modularity import stitch_mix_for, train_config, train_stitches
    from bts.pipeline.run import load_run

    out = Path(args.out)
    check_out(out, args.force)
    if args.domain and not args.run_dir:
        raise BTSError("--domain chooses training data from a run: it needs --run-dir.")
    if args.steps is not None and args.steps < 0:
        raise BTSError(f"--steps must be 0 or more (got {args.steps}).")
    if args.steps and not args.run_dir:
        raise BTSError(f"--steps {args.steps} needs training data: pass --run-dir of a pipeline run.")
    device = device_of(args)
    dtype = members_dtype_of(args, device)
    run_ = load_run(args.run_dir) if args.run_dir else None
    model = BTSForCausalLM.from_pretrained(args.stitched, dtype=dtype, device_map=device)
    grown = add_expert(model, args.expert, name=args.name)
    name = grown.config.expert_names[-1]
    steps = args.steps if args.steps is not None else (
        max(1, round(0.25 * run_.recipe.stitch.train.steps)) if run_ else 0)
    if steps:
        domain = args.domain or name
        if domain not in run_.domains:
            raise BTSError(f"domain '{domain}' is not in the run's data (domains: {', '.join(run_.domains)}); "
                           f"pass --domain (and --name) to say which domain the new expert is for.")
        mix = stitch_mix_for(run_, list(grown.config.expert_names), focus=domain, focus_weight=args.focus_weight)
        batches = run_.batcher(mix, run_.recipe.stitch.train, salt=11)
        result = train_stitches(grown, batches, train_config(run_, steps), out / "train",
                                only=name if args.train == "new" else None, desc=f"add {name}",
                                seed=run_.recipe.seed)
        print(f"trained {args.train} stitch parameters for {steps} steps on {mix}: mean loss of the last steps {result.final_loss:.4f}")
    save(grown, args.stitched, out)
    print(f"saved {out}: experts {', '.join(grown.config.expert_names)}"
          + ("" if steps else " (untrained: outputs equal the input model's)"))
    return 0
