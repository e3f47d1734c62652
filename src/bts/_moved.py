"""Old module names from before the layered layout (bts 0.1), kept working for one release.

`import bts.model` still gives `bts.core.model` — the very same module object, not a copy — and says once, as a
FutureWarning, where it lives now. Installed by `import bts`; nothing else in bts uses the old names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "bts.hf": "bts.core.hf",
    "bts.stitch": "bts.core.stitch",
    "bts.members": "bts.core.members",
    "bts.config": "bts.core.config",
    "bts.model": "bts.core.model",
    "bts.batched": "bts.core.batched",
    "bts.plan": "bts.core.plan",
    "bts.corpora": "bts.data.corpora",
    "bts.tokenizer": "bts.data.tokenizer",
    "bts.distributed": "bts.train.distributed",
    "bts.recipe": "bts.pipeline.recipe",
    "bts.modularity": "bts.pipeline.modularity",
    "bts.downstream": "bts.eval.downstream",  # and its submodules: bts.downstream.tasks -> bts.eval.downstream.tasks
    "bts.commands": "bts.cli.commands",
}
# Names that the old flat modules bts.data, bts.train and bts.pipeline exported; those names are packages now, whose
# __getattr__ hands these out (from the module that holds them today).
MOVED_NAMES = {
    "bts.data": {**dict.fromkeys(("Batcher", "eval_windows", "interleave", "tokenize_stream"), "bts.data.streams"),
                 "heldout_loss": "bts.eval.heldout"},
    "bts.train": {**dict.fromkeys(("train", "TrainResult", "lr_at", "make_optimizer", "default_loss", "KEEP_CHECKPOINTS"),
                                  "bts.train.loop"), "TrainConfig": "bts.train.config"},
    "bts.pipeline": {"Run": "bts.pipeline.run", "STAGES": "bts.pipeline.run", "PARALLEL_STAGES": "bts.pipeline.run",
                     "gate_summary": "bts.eval.gates", "count_params": "bts.pipeline.loaders",
                     "WRITE_ERRNOS": "bts.pipeline.rundir", "log": "bts.pipeline.rundir"},
}
REMOVED_IN = "bts 0.3"
_warned: set[str] = set()


def attribute(package: str, name: str):
    """`from bts.data import Batcher` as before the layout (a package's __getattr__ calls this)."""
    home = MOVED_NAMES.get(package, {}).get(name)
    if home is None:
        raise AttributeError(f"module '{package}' has no attribute '{name}'")
    if f"{package}.{name}" not in _warned:
        _warned.add(f"{package}.{name}")
        warnings.warn(f"'{package}.{name}' moved to '{home}.{name}'; the old name works until {REMOVED_IN}.",
                      FutureWarning, stacklevel=3)
    return getattr(importlib.import_module(home), name)


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str, target: str):
        self.old, self.target = old, target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system stamps the alias spec on the module: put it back below
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self._spec
        warnings.warn(f"'{self.old}' moved to '{self.target}'; the old name works until {REMOVED_IN}.",
                      FutureWarning, stacklevel=2)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        old = next((o for o in MOVED if fullname == o or fullname.startswith(o + ".")), None)
        if old is None:
            return None
        new = MOVED[old] + fullname[len(old):]
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, new))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before the path finder, which would load a second copy
