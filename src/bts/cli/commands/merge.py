"""`bts merge`: a weight-merge baseline (soup, task arithmetic, TIES, DARE) written as a Hugging Face model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from bts.cli.devices import add_device_arguments, device_of
from bts.errors import BTSError

HELP = "Merge a seed and its experts into one model (soup, task_arithmetic, ties, dare_linear, dare_ties)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bts.baselines.merges import DARE_DROP_RATE, METHODS, TIES_DENSITY

    p.add_argument("--method", required=True, choices=METHODS, help="merge method")
    p.add_argument("--seed", required=True, metavar="DIR", help="the seed model directory")
    p.add_argument("--experts", required=True, nargs="+", metavar="DIR", help="expert model directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory (must be empty or new)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, metavar="LAMBDA",
                   help="scale of the combined task vector (all but soup; default 1.0)")
    p.add_argument("--density", type=float, default=None,
                   help=f"ties: fraction of each task vector kept, in (0, 1] (default {TIES_DENSITY})")
    p.add_argument("--drop-rate", type=float, default=None,
                   help=f"dare_*: probability of dropping a task-vector entry, in [0, 1) (default {DARE_DROP_RATE})")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide the combined delta by the number of contributing experts "
                        "(default: on for ties, off otherwise, as in mergekit)")
    p.add_argument("--random-seed", type=int, default=None, help="dare_*: seed of the drop masks (default 0)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    add_device_arguments(p, members_dtype=False)  # the merge is written in the seed's own dtype


def run(args: argparse.Namespace) -> int:
    from bts.baselines.merges import check_out_dir, merge_models, resolve_params, save_merged

    params = dict(lam=args.lam, density=args.density, drop_rate=args.drop_rate, normalize=args.normalize,
                  random_seed=args.random_seed)
    resolve_params(args.method, **params)  # bad settings fail before anything is loaded
    device_of(args)  # and a missing GPU
    out = Path(args.out)
    check_out_dir(out, args.force)
    members = [Path(args.seed)] + [Path(e) for e in args.experts]
    for m in members:  # --force must never delete a member it is about to read
        if m.exists() and out.exists() and (m.resolve() == out.resolve() or out.resolve() in m.resolve().parents):
            raise BTSError(f"out '{out}' is (or contains) the member directory '{m}'; choose another --out.")
    model = merge_models(args.seed, args.experts, args.method, device=device_of(args), **params)
    save_merged(model, model._bts_merge["seed"], out, force=args.force)
    print(f"wrote {args.method} merge of {len(args.experts) + 1} members to {out}")
    return 0
