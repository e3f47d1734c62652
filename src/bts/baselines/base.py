"""The interface every baseline implements (each method's file declares its own; bts.baselines.registry collects
them), and what they share: the run's members, training on the stitch's datamix, parameter accounting.

    baseline.name                   the recipe's and results.json's name (`baselines.methods`)
    baseline.options                the recipe keys under `baselines.` it reads
    baseline.check(b, prefix)       refuses a bad value of one of those, one sentence naming the dotted key
    baseline.build(run) -> dict     makes (and, if trained, trains) it under run.model_dir(name); returns what
                                    its stage marker records
    baseline.load(path, info, device=None, dtype=None)
                                    -> (the model to evaluate, its accounting: trainable_params, total_params,
                                    active_params [+ merge]); its weights read onto `device` in `dtype`
                                    (the run's members_dtype; default: the CPU, float32)
    baseline.budget(recipe)         the training phase it uses (TrainConfig), None when untrained; `trained` says so

`run` is the pipeline's run (bts.pipeline.run.Run): recipe, path(), model_dir(), domains, stream(), batcher(), stitch_mix().
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

from bts.atomic import atomic_write_json
from bts.core.members import copy_tokenizer
from bts.errors import BTSError

STITCH_SALT = 7  # trained baselines draw the stitch's batches: the same salt as the stitch stage


class Baseline:
    options: tuple[str, ...] = ()
    trained = False

    def __init__(self, name: str):
        self.name = name

    def check(self, options, prefix: str = "baselines.") -> None:
        """Refuse a bad value of one of `options` (the recipe's baselines section) naming `prefix` + key."""

    def build(self, run) -> dict:
        raise NotImplementedError

    def load(self, path, info: dict, device=None, dtype=None):
        raise NotImplementedError

    def budget(self, recipe):
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def positive(value, where: str) -> None:
    """A positive, finite number (also refuses nan): one sentence naming `where`."""
    if not value > 0:
        raise BTSError(f"{where} must be positive (got {value}).")
    if value == math.inf:
        raise BTSError(f"{where} must be finite (got {value}).")


def run_members(run) -> tuple[str, list[str]]:
    """The run's seed and expert folders (seed first, experts in the recipe's order)."""
    return str(run.model_dir("seed")), [str(run.model_dir(f"expert-{d}")) for d in run.recipe.expert_domains]


def train_on_stitch_mix(run, name: str, model, trainable: dict, cfg, **kwargs) -> dict:
    """Train `trainable` of `model` on the stitch's datamix under phase `cfg`; what the stage marker records."""
    from bts.train.loop import train

    batches = run.batcher(run.stitch_mix(), cfg, salt=STITCH_SALT)
    result = train(model, trainable, batches, cfg, run.path("train", name), desc=name, seed=run.recipe.seed,
                   device=run.device, **kwargs)
    return {"tokens": result.tokens, "train_wall_s": result.wall_s, "final_loss": result.final_loss}


def accounting(counts: dict) -> dict:
    """{total, active, trainable} parameter counts as the results record them."""
    return {"trainable_params": counts["trainable"], "total_params": counts["total"], "active_params": counts["active"]}


def write_model_dir(model, out_dir, *, tokenizer_from=None, record: tuple[str, dict] | None = None) -> Path:
    """Write `model` as a Hugging Face model folder with `tokenizer_from`'s tokenizer files and, if given, a JSON
    record (name, content) of how it was made. Everything is written into a hidden sibling folder renamed onto
    `out_dir` at the end, so an error leaves nothing behind and `out_dir` is either untouched or complete (an
    existing one is moved aside first, so no failure in between leaves both versions' files missing)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(staging)
        copy_tokenizer(tokenizer_from, staging)
        if record is not None:
            atomic_write_json(staging / record[0], record[1])
        if not out.exists():
            os.rename(staging, out)
        else:
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.rename(out, old / "previous")
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
