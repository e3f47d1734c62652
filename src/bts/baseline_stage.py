"""The baselines stage of the pipeline: every baseline of the paper, built and trained on the same terms as BTS."""

from __future__ import annotations


def run_baselines(run) -> None:
    """Build (and, for trained methods, train) each baseline listed in recipe.baselines.methods."""
    if not run.recipe.baselines.methods or run.done("baselines"):
        return
    raise NotImplementedError("baselines are wired in by the baselines issue")


def baseline_methods(run) -> dict:
    """name -> (loader, stage info) for every baseline the run has built."""
    return {}
