"""The run directory's bookkeeping: one process per directory (a lock, with atomic takeover of a crashed run's),
stage markers, and the manifest (recipe.yaml, env.json) that refuses a changed recipe in an existing directory.

    d = RunDir("runs/demo")
    with d.lock():
        d.write_manifest(recipe)
        if not d.done("seed"):
            with d.stage("seed") as info:   # stages/seed.json is written when the body completes
                info["tokens"] = ...
"""

from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import yaml

from bts.atomic import atomic_write_json, atomic_write_text
from bts.errors import BTSError
from bts.train import distributed

# errno values of a write that failed for reasons outside bts (disk full, quota, read-only or not a folder)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EFBIG}


def log(msg: str) -> None:
    if distributed.is_main():
        print(f"bts: {msg}", file=sys.stderr, flush=True)


def marker_name(stage: str) -> str:
    """stages/<this>.json records a finished stage (expert:code -> expert-code)."""
    return stage.replace(":", "-")


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, *parts) -> Path:
        return self.root.joinpath(*parts)

    # ---- stage markers -------------------------------------------------------------------------------------
    def done(self, stage: str) -> dict | None:
        marker = self.path("stages", f"{marker_name(stage)}.json")
        return json.loads(marker.read_text()) if marker.exists() else None

    @contextmanager
    def stage(self, stage: str):
        """Run a stage body; record its wall time (and what the body put in `info`) when it completes."""
        info = {"stage": stage}
        t0 = time.perf_counter()
        log(f"stage {stage} …")
        yield info
        info["wall_s"] = round(time.perf_counter() - t0, 2)
        if not distributed.is_main():  # rank 0 records the stage
            return
        atomic_write_json(self.path("stages", f"{marker_name(stage)}.json"), info)
        log(f"stage {stage} done in {info['wall_s']:.0f}s")

    # ---- one process per run directory ---------------------------------------------------------------------
    @contextmanager
    def lock(self, name: str = "run"):
        """One process per run directory: a second one refuses instead of interleaving writes (under torchrun,
        rank 0 holds it for the job)."""
        if not distributed.is_main():
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.path(f"{name}.lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock.read_text().strip() or "?"
            if not (pid.isdigit() and not _alive(int(pid))):
                raise BTSError(f"run directory '{self.root}' is in use by process {pid} (remove {lock} if it is not).")
            fd = self._take_over(lock, pid)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def _take_over(self, lock: Path, dead_pid: str) -> int:
        """Replace the lock of a crashed run. Two processes may both find it stale: only the one that creates the
        side file <lock>.takeover may replace it, and only if the lock still names the dead process (the other
        may have replaced it already)."""
        guard = lock.with_name(lock.name + ".takeover")
        try:
            guard_fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise BTSError(f"run directory '{self.root}' is being taken over by another process "
                           f"(remove {guard} if none is running).") from None
        try:
            now = lock.read_text().strip() if lock.exists() else dead_pid
            if now != dead_pid:
                raise BTSError(f"run directory '{self.root}' is in use by process {now or '?'} "
                               f"(remove {lock} if it is not).")
            lock.unlink(missing_ok=True)
            return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        finally:
            os.close(guard_fd)
            guard.unlink(missing_ok=True)

    # ---- the manifest --------------------------------------------------------------------------------------
    def write_manifest(self, recipe) -> None:
        """recipe.yaml (refusing a recipe other than the one the directory was made with) and env.json."""
        from bts.pipeline.recipe import load_recipe, recipe_to_dict

        current = recipe_to_dict(recipe)
        stored = self.path("recipe.yaml")
        if stored.exists():  # finished stages were made with that recipe: never mix two recipes in one run
            # ... except the modularity section: no other stage reads it, and its own stage reruns when it changes
            # A recipe stored by an older bts is read with today's defaults, so options added since do not count
            # as changes.
            # ... and the device: where a run computes is not what it computes (a run started on a CPU may go on
            # on a GPU). A run made before devices existed ran on a CPU, where a phase's dtype float32 is "auto".
            old = _result_keys(recipe_to_dict(load_recipe(str(stored))))
            if "device" not in (yaml.safe_load(stored.read_text()) or {}):
                _older_dtypes(old, current)
            diff = _first_difference(old, _result_keys(current))
            if diff is not None:
                key, old, new = diff
                raise BTSError(f"run directory '{self.root}' was made with {key}={old!r}, not {new!r}; "
                               "use a new --run-dir (or delete this one) to run a changed recipe.")
        atomic_write_text(stored, yaml.safe_dump(current, sort_keys=False))
        import torch

        versions = {}
        for pkg in ("bts", "torch", "transformers", "tokenizers", "safetensors", "datasets"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                    cwd=Path(__file__).parent).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
        atomic_write_json(self.path("env.json"), {"versions": versions, "git_commit": commit,
                                                  "python": platform.python_version(), "threads": torch.get_num_threads()})

    def write_error(self, exc: OSError) -> BTSError:
        """A full disk or an unwritable folder is the user's to fix: one line, not a traceback. Writes are atomic
        and stage markers come last, so nothing half-written is taken for complete on the next run."""
        where = f" at '{exc.filename}'" if exc.filename else ""
        return BTSError(f"run directory '{self.root}': {exc.strerror}{where}; finished stages are kept and the "
                        "same command resumes once this is fixed.")


SHIFTABLE = ("modularity", "device")  # recipe keys that may change between runs over one run directory
# and the settings of a training phase that do not change what it trains (logging, checkpoints, trackers)
FREE_TRAIN_KEYS = ("log_every", "ckpt_every", "report_to")


def _result_keys(recipe: dict) -> dict:
    """A recipe dict without what may change over one run directory (SHIFTABLE, FREE_TRAIN_KEYS)."""
    out = {k: v for k, v in recipe.items() if k not in SHIFTABLE}
    for section in ("seed_model", "experts", "stitch"):
        if isinstance(out.get(section), dict) and isinstance(out[section].get("train"), dict):
            train = {k: v for k, v in out[section]["train"].items() if k not in FREE_TRAIN_KEYS}
            out[section] = {**out[section], "train": train}
    return out


def _older_dtypes(old: dict, new: dict) -> None:
    """In a recipe stored before devices existed, a training phase's dtype float32 meant what "auto" means on the
    CPU it ran on: count it as today's value when that is "auto"."""
    for section in ("seed_model", "experts", "stitch"):
        train_old, train_new = old.get(section, {}).get("train", {}), new.get(section, {}).get("train", {})
        if train_old.get("dtype") == "float32" and train_new.get("dtype") == "auto":
            train_old["dtype"] = "auto"


def _first_difference(old, new, prefix: str = ""):
    """The first dotted key whose value differs between two nested dicts, with both values; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if old == new else (prefix.rstrip("."), old, new)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
