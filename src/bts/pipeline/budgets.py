"""What each training phase of a run trains on and for how long: the `budget` its stage marker records and the
report's budget table reads."""

from __future__ import annotations


def budget(run, phase: str) -> dict | None:
    """What a training phase trains on and for how long (the report's budget table); None: it does not train."""
    r = run.recipe
    if (phase == "seed" and r.seed_model.path
            or phase.startswith("expert:") and phase.split(":", 1)[1] in r.experts.paths):
        return None  # given, not trained
    if phase == "seed":
        data, cfg = run.seed_mix(), r.seed_model.train
    elif phase.startswith("expert:"):
        data, cfg = phase.split(":", 1)[1], r.experts.train_config()
    elif phase == "stitch":
        data, cfg = run.stitch_mix(), r.stitch.train
    else:
        from bts.baselines.registry import REGISTRY

        data, cfg = run.stitch_mix(), REGISTRY[phase.split(":", 1)[1]].budget(r)
        if cfg is None:
            return None
    return {"data": data, "steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": r.data.seq_len, "lr": cfg.lr}
