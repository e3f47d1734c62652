"""The `--device` / `--members-dtype` options every computing command shares, and what they resolve to.

    add_device_arguments(p)                    # in a command's add_arguments
    device = device_of(args)                   # torch.device; CUDA asked for where there is none: one sentence
    dtype = members_dtype_of(args, device)     # bf16 on a GPU, fp32 on a CPU, unless --members-dtype says

All resolution is bts.core.device's; this module only spells the options once. On `bts run` / `bts demo` the options
override the recipe's `device` / `members_dtype` keys (recipe_overrides).
"""

from __future__ import annotations

import argparse

import torch

from bts.core.device import MEMBERS_DTYPE_CHOICES, check_members_dtype, members_dtype, resolve_device


def add_device_arguments(p: argparse.ArgumentParser, *, members_dtype: bool = True,
                         dtype_alias: str | None = None) -> None:
    """--device (auto | cpu | cuda | cuda:N; default: the recipe's, else auto) and, with members_dtype, --members-dtype
    (auto | float32 | bfloat16 | float16). dtype_alias: an older spelling of --members-dtype kept working
    (e.g. "--dtype")."""
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: auto)")
    if members_dtype:
        names = ["--members-dtype", *([dtype_alias] if dtype_alias else [])]
        p.add_argument(*names, dest="members_dtype", default=None, metavar="DTYPE",
                       help=f"dtype models are loaded in: {', '.join(MEMBERS_DTYPE_CHOICES)} "
                            "(default auto: bfloat16 on a GPU, float32 on a CPU)")


def device_of(args: argparse.Namespace) -> torch.device:
    """The command's device: --device resolved (auto when not given)."""
    return resolve_device(getattr(args, "device", None) or "auto", "--device")


def members_dtype_of(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    spec = getattr(args, "members_dtype", None) or "auto"
    check_members_dtype(spec, "--members-dtype")
    return members_dtype(spec, device)


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """The recipe overrides `--device` / `--members-dtype` stand for (checked with the recipe when it loads)."""
    out = []
    if getattr(args, "device", None):
        out.append(f"device={args.device}")
    if getattr(args, "members_dtype", None):
        out.append(f"members_dtype={args.members_dtype}")
    return out
