"""`bts run RECIPE [key=value ...]`: run the pipeline of a recipe (a YAML file or a built-in name)."""

from pathlib import Path

from bts.cli.devices import add_device_arguments, recipe_overrides
from bts.errors import BTSError
from bts.pipeline.run import STAGES, Run
from bts.pipeline.recipe import builtin_recipes, load_recipe

HELP = ("run a recipe's pipeline: data → tokenizer → seed → experts → stitch → baselines → evaluate → downstream → "
        "modularity → report")


def add_arguments(p):
    p.add_argument("recipe", help=f"a recipe YAML file or a built-in recipe ({', '.join(builtin_recipes())})")
    add_run_arguments(p)


def add_run_arguments(p):
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. stitch.train.steps=200")
    p.add_argument("--run-dir", help="output directory (default: runs/<recipe name>)")
    p.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)}, expert:<domain>")
    p.add_argument("--print-expert-commands", action="store_true",
                   help="print one `bts run … --stages expert:<domain>` command per expert (to launch as separate "
                        "jobs, e.g. a Slurm array) and exit")
    add_device_arguments(p)  # override the recipe's device / members_dtype


def run(args, recipe_name=None):
    overrides = [*(args.overrides or []), *recipe_overrides(args)]
    from bts.pipeline.study import is_study

    if is_study(recipe_name or args.recipe):  # a study over a base recipe (recipes/paper.yaml, docs/paper.md)
        return _study(args, recipe_name or args.recipe, overrides)
    recipe = load_recipe(recipe_name or args.recipe, overrides)
    if getattr(args, "print_expert_commands", False):
        from bts.train.distributed import expert_commands

        print("\n".join(expert_commands(recipe_name or args.recipe, recipe, args.run_dir, overrides)))
        return 0
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    runner = Run(recipe, args.run_dir)
    results = runner.all(stages)
    from bts.train import distributed

    if results and distributed.is_main():  # under torchrun, rank 0 speaks for the job
        from bts.report import markdown_table, results_table

        print(markdown_table(*results_table(results)))
        print(f"\nreport: {runner.root / 'report' / 'report.md'}")
    return 0


def _study(args, name, overrides):
    from bts.pipeline.study import load_study, run_study

    if args.stages or getattr(args, "print_expert_commands", False):
        raise BTSError(f"'{name}' is a study: --stages and --print-expert-commands apply to one recipe's run, "
                       "not to a study's sub-runs.")
    study = load_study(name, overrides)
    root = Path(args.run_dir or Path("runs") / study.name)
    run_study(study, root)
    print(f"study: {root / 'study.json'}\nreport: {root / 'report' / 'report.md'}")
    return 0
