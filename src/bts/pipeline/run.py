"""The Branch-Train-Stitch pipeline as stages over one run directory.

    run = Run(load_recipe("demo"))
    run.all()   # data → tokenizer → seed → experts → stitch → baselines → evaluate → downstream → modularity
                #   → report

Each stage writes its outputs under the run directory and, when complete, a marker stages/<stage>.json; running
again skips finished stages and resumes an interrupted training stage from its last checkpoint. Expert stages are
independent of each other (`bts run RECIPE --stages expert:code` on one machine, expert:math on another).

`Run` is a RunData (bts.pipeline.rundata: the recipe over a run directory, and the run's data, as the stages, the
baselines and the modularity measurement use it) that runs the stages (bts.pipeline.stages, one function per
stage, in order). The directory's lock, markers and manifest are bts.pipeline.rundir.

Layout of a run directory:
    recipe.yaml, env.json                 resolved recipe, package versions, git commit
    data/<domain>/{train,val,heldout}.jsonl, provenance.json, {train,val,heldout}.tokens/ (token shards)
    tokenizer/                            (when no seed model is given)
    models/seed, models/expert-<domain>, models/bts, models/<baseline>   (a given seed or expert stays where it
                                          is: its marker records folder + sha256; RunData.model_dir)
    train/<phase>/metrics.jsonl, ckpt/    per training phase
    eval/<method>.json, eval/gates.json   held-out scores per method; the stitched model's gates (for the report)
    results.json, report/{report.md, report.html, *.png}
    modularity/{settings.json, results.json, train/}   when modularity.enabled (docs/modularity.md)
"""

from __future__ import annotations

from bts.pipeline.rundata import RunData, load_run_data
from bts.pipeline.stages import PARALLEL_STAGES, STAGES, run_stages

__all__ = ["Run", "STAGES", "PARALLEL_STAGES", "load_run"]


class Run(RunData):
    def all(self, only: list[str] | None = None) -> dict | None:
        """Run the stages (all, or `only`: names from STAGES plus expert:<domain>) in order; results.json's
        content when there is one."""
        return run_stages(self, only)


def load_run(run_dir) -> Run:
    """A pipeline run directory (its resolved recipe.yaml and data) as a Run."""
    return load_run_data(run_dir, Run)
