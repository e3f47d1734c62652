"""`bts report RUN_DIR`: (re)write the report of a finished run from its files."""

from pathlib import Path

from bts.errors import BTSError
from bts.pipeline.run import load_run
from bts.pipeline.stages import report

HELP = "rewrite report.md / report.html and the plots of a finished run"


def add_arguments(p):
    p.add_argument("run_dir")


def run(args):
    root = Path(args.run_dir)
    if not (root / "recipe.yaml").exists():
        raise BTSError(f"'{root}' is not a bts run directory (no recipe.yaml).")
    if not (root / "results.json").exists():
        raise BTSError(f"'{root}' has no results.json; run the evaluate stage first.")
    report(load_run(root))  # the pipeline's report stage: fills in what an older run directory lacks
    print(root / "report" / "report.md")
    return 0
