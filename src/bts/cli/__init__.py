"""The `bts` command line: a thin layer over the Python API.

Each subcommand lives in its own module under `bts.cli.commands` and defines HELP, add_arguments(parser) and
run(args) -> int. User errors (BTSError) print one line and exit 2; nothing else is caught, so bugs keep their
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import bts.cli.commands
from bts.errors import BTSError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bts", description="Branch-Train-Stitch: stitch domain experts into one LM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(bts.cli.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"bts.cli.commands.{info.name}")
        name = getattr(module, "NAME", info.name.replace("_", "-"))
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def quiet_libraries() -> None:
    """bts draws its own progress bars; transformers' per-file load/save bars would drown them."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options (`bts demo --run-dir D stitch.train.steps=5`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    quiet_libraries()
    try:
        return int(args._run(args) or 0)
    except BTSError as exc:
        print(f"bts: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bts: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
