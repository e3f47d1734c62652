"""`bts demo`: the whole paper in miniature on real text, on a CPU (the built-in `demo` recipe)."""

from bts.cli.commands import run as run_command

HELP = "branch a tiny seed into code/prose/math/legal experts, stitch them, compare against baselines, report"


def add_arguments(p):
    p.add_argument("--recipe", default="demo", help="built-in recipe to run (demo, smoke, …)")
    run_command.add_run_arguments(p)


def run(args):
    return run_command.run(args, recipe_name=args.recipe)
