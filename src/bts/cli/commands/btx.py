"""`bts btx --seed DIR --experts DIR... --out DIR`: build an untrained BTX mixture-of-experts and save it.

The output is a bts_btx folder (the seed's own architecture, any family, with MoE FFNs; AutoModelForCausalLM loads it
after `import bts.baselines.btx`, and bts.baselines.btx.load_btx loads it too); `--mixtral` writes a stock Mixtral
folder instead (Llama / Mistral seeds only). The MoE finetune itself runs through the shared training loop.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bts.cli.devices import add_device_arguments, device_of
from bts.errors import BTSError

HELP = "build a BTX mixture of experts (members' FFNs as experts, other weights averaged, new routers) and save it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from bts.baselines.btx import ROUTINGS

    p.add_argument("--seed", required=True, metavar="DIR", help="the seed model directory")
    p.add_argument("--experts", required=True, nargs="+", metavar="DIR", help="expert model directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory (must be empty or new)")
    p.add_argument("--routing", choices=ROUTINGS, default="top2", help="routing variant (default top2, as BTX)")
    p.add_argument("--no-seed-expert", action="store_true",
                   help="do not make the seed one of the experts (BTX includes it as the generalist)")
    p.add_argument("--router-init-std", type=float, default=None,
                   help="std of the random router init (default: the seed's initializer_range)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the router init (default 0)")
    p.add_argument("--mixtral", action="store_true",
                   help="write a stock Mixtral checkpoint (Llama / Mistral seeds) instead of the bts_btx format")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    add_device_arguments(p, members_dtype=False)  # BTX is written in the seed's own dtype


def run(args: argparse.Namespace) -> int:
    from bts.baselines.btx import btx_parameter_counts, build_btx, save_btx

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:  # fail before loading
        raise BTSError(f"out '{out}' already exists and is not empty (use --force to replace it).")
    device = device_of(args)
    model = build_btx(args.seed, args.experts, include_seed=not args.no_seed_expert, routing=args.routing,
                      router_init_std=args.router_init_std, seed_rng=args.random_seed, device=device)
    save_btx(model, out, force=args.force, export="mixtral" if args.mixtral else "bts")
    counts = btx_parameter_counts(model)
    form = "a Mixtral checkpoint" if args.mixtral else "bts_btx"
    print(f"wrote BTX {args.routing} ({form}) with {model.config.num_local_experts} experts to {out}: "
          f"{counts['total']:,} parameters, {counts['active']:,} active per token")
    return 0
