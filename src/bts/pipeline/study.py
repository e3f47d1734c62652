"""A study: one base recipe run over several seeds, plus stitching variants and a stitch-budget curve, with the
numbers aggregated as mean ± spread (docs/paper.md; the bundled one is recipes/paper.yaml).

    study = load_study("paper", ["stitch.train.steps=20"])   # overrides apply to the base recipe
    run_study(study, "runs/paper")                           # sub-runs, then study.json and report/

A study file has the keys name, base (a recipe name or file), seeds, variants (name -> dotted overrides) and curve
(multiples of the base's stitch.train.steps). Layout of DIR:
    seed-<s0>/               the full base pipeline with seed s0: members trained here, every method, downstream
    seed-<s>/                seed s: members given from seed-<s0> (referenced, not trained), the trained baselines
                             only (the merges and BTM do not depend on the seed), stitch, evaluate, downstream
    variant-<name>/seed-<s>/ each variant, each seed: given members, no baselines, up to evaluate
    steps-<n>/seed-<s>/      each curve point likewise, with stitch.train.steps = n
    study.json, report/      the aggregate (bts.report.study)
Every sub-run is an ordinary run directory, so running the study again skips what finished (stage markers).
A variant or curve point whose recipe is refused (an option this bts does not have) is not run: its one-sentence
error is printed and recorded in study.json and the report; everything else in the study file is checked, and a
bad key refused, before anything is written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from pathlib import Path

from bts.errors import BTSError
from bts.pipeline.recipe import SAFE_NAME, Recipe, _apply_override, load_recipe, read_recipe

STUDY_KEYS = ("name", "base", "seeds", "variants", "curve")
SEED_STAGES = ["data", "tokenizer", "seed", "experts", "stitch", "baselines", "evaluate", "downstream", "report"]
VARIANT_STAGES = ["data", "tokenizer", "seed", "experts", "stitch", "evaluate"]


def is_study(name_or_path: str) -> bool:
    """Whether a recipe name or file is a study (it has `base:`) rather than a pipeline recipe."""
    raw = read_recipe(name_or_path)
    return isinstance(raw, dict) and "base" in raw


@dataclasses.dataclass
class SubRun:
    name: str  # seed-1, variant-mix_hidden/seed-0, steps-600/seed-2
    seed: int
    overrides: list  # on top of the base recipe and the study's base overrides
    stages: list | None  # None: every stage
    recipe: Recipe | None = None
    error: str = ""  # the recipe's one-sentence refusal: the sub-run is not run


@dataclasses.dataclass
class Study:
    name: str
    base: str
    seeds: list
    variants: dict
    curve: list
    base_overrides: list
    subruns: list = dataclasses.field(default_factory=list)
    base_recipe: Recipe | None = None  # the base with the overrides and the first seed (seed-<s0>'s recipe)
    steps_points: list = dataclasses.field(default_factory=list)  # the curve's stitch.train.steps, base's excluded


def _ov(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: paths and lists survive the override parser


def load_study(name_or_path: str, overrides: list[str] = ()) -> Study:
    """A study file with dotted overrides (a key of the study itself, `seeds=[0,1]`, sets it; any other applies to
    the base recipe), every sub-run's recipe built and checked. Reads no model and writes nothing."""
    raw = read_recipe(name_or_path)
    if not isinstance(raw, dict) or "base" not in raw:
        raise BTSError(f"recipe '{name_or_path}' is not a study (a study has a 'base' key).")
    base_overrides = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.split(".")[0] in STUDY_KEYS and "=" in item:
            _apply_override(raw, item)
        else:
            base_overrides.append(item)
    for key in raw:
        if key not in STUDY_KEYS:
            close = difflib.get_close_matches(str(key), STUDY_KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(STUDY_KEYS)})"
            raise BTSError(f"unknown study key '{key}' in '{name_or_path}'{hint}.")
    name = str(raw.get("name", "study"))
    if not SAFE_NAME.fullmatch(name):
        raise BTSError(f"study name '{name}' must be letters, digits, '_', '.' or '-'.")
    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise BTSError(f"study key 'seeds' must be a list of distinct integers ≥ 0 (got {seeds!r}).")
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) and v for v in variants.values()):
        raise BTSError(f"study key 'variants' must map each name to dotted overrides, e.g. "
                       f"{{mix_hidden: {{stitch.output: mix_hidden}}}} (got {variants!r}).")
    for v in variants:
        if not SAFE_NAME.fullmatch(str(v)):
            raise BTSError(f"variant name '{v}' must be letters, digits, '_', '.' or '-'.")
    curve = raw.get("curve") or []
    if not isinstance(curve, list) or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0
                                              for f in curve):
        raise BTSError(f"study key 'curve' must be a list of positive multiples of stitch.train.steps "
                       f"(got {curve!r}).")
    base_name = str(raw["base"])
    if not Path(base_name).is_file() and Path(name_or_path).is_file() and (Path(name_or_path).parent / base_name).is_file():
        base_name = str(Path(name_or_path).parent / base_name)  # a base file next to the study file
    study = Study(name, base_name, seeds, {str(k): v for k, v in variants.items()}, curve, base_overrides)
    _plan(study)
    return study


def _plan(study: Study) -> None:
    """The sub-runs and their recipes. The base (with the base overrides and the first seed) must load: its
    error is the study's. Members of every other sub-run are seed-<s0>'s, by the folders its run will hold."""
    s0 = study.seeds[0]
    base = load_recipe(study.base, [*study.base_overrides, f"seed={s0}"])
    study.base_recipe = base
    study.subruns = [SubRun(f"seed-{s0}", s0, [], None, base)]  # every stage (modularity too, when enabled)
    from bts.baselines.registry import REGISTRY

    trained = [m for m in base.baselines.methods if REGISTRY[m].budget(base) is not None]
    for s in study.seeds[1:]:
        study.subruns.append(SubRun(f"seed-{s}", s, [_ov("baselines.methods", trained)], SEED_STAGES))
    for vname, ov in study.variants.items():
        items = [_ov(str(k), v) for k, v in ov.items()]
        for s in study.seeds:
            study.subruns.append(SubRun(f"variant-{vname}/seed-{s}", s, [_ov("baselines.methods", []), *items],
                                        VARIANT_STAGES))
    steps = base.stitch.train.steps
    points = sorted({max(1, round(f * steps)) for f in study.curve} - {steps})
    for n in points:
        for s in study.seeds:
            study.subruns.append(SubRun(f"steps-{n}/seed-{s}", s, [_ov("baselines.methods", []),
                                                                   _ov("stitch.train.steps", n)], VARIANT_STAGES))
    study.steps_points = points


def member_overrides(study: Study, root: Path) -> list[str]:
    """seed_model.path and experts.paths for the sub-runs: whatever seed-<s0> used (a given folder stays given),
    else the folders seed-<s0> trains, as absolute paths."""
    base, s0dir = study.base_recipe, (root / study.subruns[0].name).resolve()
    out = [_ov("seed_model.path", base.seed_model.path or str(s0dir / "models" / "seed"))]
    for d in base.expert_domains:
        out.append(_ov(f"experts.paths.{d}", base.experts.paths.get(d) or str(s0dir / "models" / f"expert-{d}")))
    return out


def resolve(study: Study, root: Path) -> None:
    """Every sub-run's recipe (base overrides + given members + its own), its refusal recorded rather than raised
    for variants and curve points."""
    given = member_overrides(study, root)
    for sub in study.subruns[1:]:
        try:
            sub.recipe = load_recipe(study.base, [*study.base_overrides, f"seed={sub.seed}", *given, *sub.overrides])
        except BTSError as exc:
            if sub.name.startswith("seed-"):
                raise  # the seeds are the study itself
            sub.error = str(exc)


def _log(msg: str) -> None:
    print(f"bts study: {msg}", file=sys.stderr, flush=True)


def run_study(study: Study, run_dir: str | Path | None = None) -> dict:
    """Run every sub-run (finished stages are skipped), then aggregate into DIR/study.json and DIR/report/."""
    from bts.pipeline.run import Run

    root = Path(run_dir or Path("runs") / study.name)
    if root.exists() and not root.is_dir():
        raise BTSError(f"--run-dir '{root}' is a file, not a directory.")
    resolve(study, root)  # before anything is written
    for sub in study.subruns:
        if sub.error:
            _log(f"{sub.name}: not run: {sub.error}")
    for sub in study.subruns:
        if sub.error:
            continue
        _log(f"{sub.name} ({'every stage' if sub.stages is None else ', '.join(sub.stages)})")
        Run(sub.recipe, root / sub.name).all(sub.stages)
    return aggregate(study, root)


def _results(root: Path, name: str) -> dict | None:
    path = root / name / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def aggregate(study: Study, root: Path) -> dict:
    """study.json and report/ from the sub-runs' results.json (those that have one)."""
    from bts.atomic import atomic_write_json
    from bts.report.study import aggregate_downstream, aggregate_methods, stats, write_study_report

    seeds = [r for s in study.seeds if (r := _results(root, f"seed-{s}")) is not None]
    out = {"schema": "bts.study/1", "name": study.name, "base": study.base, "seeds": study.seeds,
           "base_overrides": study.base_overrides,
           "spread": "half the range over seeds, (max - min) / 2",
           "tie": "|mean_a - mean_b| <= max(spread_a, spread_b)",
           "seed_independent": "merges and BTM: seed-0's run alone; seed and experts: the same models in every run",
           "methods": aggregate_methods(seeds), "downstream": aggregate_downstream(seeds), "variants": {},
           "curve": []}

    def bts_avg(prefix: str) -> dict:
        runs = [r for s in study.seeds if (r := _results(root, f"{prefix}/seed-{s}")) is not None]
        return {"avg": stats(r["methods"]["bts"]["avg_heldout_loss"] for r in runs if "bts" in r["methods"]),
                "tokens": next((r["methods"]["bts"].get("train_tokens") for r in runs if "bts" in r["methods"]),
                               None)}

    errors = {sub.name.split("/")[0]: sub.error for sub in study.subruns if sub.error}
    for vname, ov in study.variants.items():
        key = f"variant-{vname}"
        entry = {"overrides": ov, "overrides_text": ", ".join(f"{k}={json.dumps(v)}" for k, v in ov.items())}
        out["variants"][vname] = {**entry, "error": errors[key]} if key in errors else {**entry, **bts_avg(key)}
    if study.curve:
        base_tokens = next((r["methods"]["bts"].get("train_tokens") for r in seeds if "bts" in r["methods"]), None)
        paper = out["methods"].get("bts", {}).get("avg", stats([]))
        points = [{"steps": study.subruns[0].recipe.stitch.train.steps, "base": True, "avg": paper,
                   "tokens": base_tokens}]
        for n in study.steps_points:
            key = f"steps-{n}"
            points.append({"steps": n, "error": errors[key]} if key in errors else {"steps": n, **bts_avg(key)})
        out["curve"] = sorted(points, key=lambda p: p["steps"])
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "study.json", out)
    report = write_study_report(out, root / "report")
    _log(f"study.json and {report}")
    return out
