"""Models a recipe gives rather than trains (seed_model.path, experts.paths): each must be a local directory or a
hub id already in the local cache, checked before a run writes anything, so a missing checkpoint is one sentence
and not a half-made run directory (nothing is ever downloaded behind the user's back)."""

from __future__ import annotations

from bts.core.members import resolve_dir
from bts.pipeline.recipe import Recipe

# Stages that read only the run directory's files: they need no member.
NO_MEMBERS = {"report"}


def check_given_models(recipe: Recipe, stages: list[str] | None = None) -> None:
    """Refuse (BTSError, one sentence) a given model that is neither a directory nor cached."""
    if stages and set(stages) <= NO_MEMBERS:
        return
    if recipe.seed_model.path:
        resolve_dir(recipe.seed_model.path, "seed_model.path")
    for domain, spec in recipe.experts.paths.items():
        resolve_dir(str(spec), f"experts.paths.{domain}")
