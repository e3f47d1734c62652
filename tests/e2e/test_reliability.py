"""Crash safety: `kill -9` in every phase of `bts run`, then the same command again, gives bit-for-bit the results
of an uninterrupted run; half-written files are never read; damaged checkpoints fall back with a warning; one
process per run directory; write failures are one-line errors.

Crashes are injected with BTS_FAULT_AT (bts.faults): the child SIGKILLs itself at a named point, so the kill
lands at a chosen step, deterministically. Children are forked from the test process (bts.cli.child.run_cli), which
reuses its imports; a real `python -m bts` subprocess is used where the process boundary itself matters.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY
from bts.cli.child import run_cli

# The smoke recipe cut to the bone: two fixture domains, a 2-layer seed, a few steps per phase with a checkpoint
# every 2 steps, one trained baseline of each kind (routing, BTX), no downstream tasks.

# One crash per phase, in pipeline order; each re-run resumes and is killed in the next phase.
CRASHES = [
    ("data:code", "data: after the first domain's splits, before the stage marker"),
    ("shard:code:train:0", "tokenization: the first shard's tokens written, before it is renamed into place"),
    ("seed:3", "seed pretraining mid-way (checkpoint at step 2)"),
    ("expert:code:3", "an expert mid-way"),
    ("expert:math:4", "an expert after its last checkpoint, before the model is saved"),
    ("stitch:1", "stitch training before its first checkpoint"),
    ("routing:3", "the routing baseline mid-way"),
    ("btx_top2:3", "the BTX baseline mid-way"),
    ("evaluate:expert:code", "evaluation after the second cached entry"),
    ("write:bts.json", "evaluation inside the atomic write of eval/bts.json"),
]


def bts(args, log, fault=None):
    return run_cli(["run", "smoke", *TINY, *args], log, fault=fault)


def _strip_timing(obj):
    """Wall times and throughput differ between any two runs; everything else must not."""
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if "wall_s" not in k and k != "tok_per_s"}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _fingerprint(root: Path) -> dict:
    """What an uninterrupted and a crashed-and-resumed run must share: results, stage records, every metric
    line, and every weight file byte for byte."""
    out = {"results": _strip_timing(json.loads((root / "results.json").read_text()))}
    for f in sorted((root / "stages").glob("*.json")):
        out[f"stages/{f.name}"] = _strip_timing(json.loads(f.read_text()))
    for f in sorted((root / "train").glob("*/metrics.jsonl")):
        out[str(f.relative_to(root))] = [_strip_timing(json.loads(x)) for x in f.read_text().splitlines()]
    for f in sorted((root / "models").rglob("*.safetensors")):
        out[str(f.relative_to(root))] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    assert bts(["--run-dir", str(root / "run")], root / "log") == 0, (root / "log").read_text()
    return root / "run"


def test_kill_9_in_every_phase_then_rerun_equals_uninterrupted(reference, tmp_path):
    run = tmp_path / "run"
    for fault, where in CRASHES:
        rc = bts(["--run-dir", str(run)], tmp_path / "log", fault=fault)
        assert rc == -9, f"the crash '{where}' did not happen (exit {rc}): {(tmp_path / 'log').read_text()[-2000:]}"
        assert (run / "run.lock").exists()  # left behind by the dead process: the re-run must take it over
        if fault == "shard:code:train:0":  # the half-written shard is under a temporary name, never read
            assert not (run / "data/code/train.tokens").exists() and list((run / "data/code").glob(".train.*.tmp-*"))
        if fault == "seed:3":
            assert [p.name for p in (run / "train/seed/ckpt").glob("step-*")] == ["step-0000002"]
        if fault == "write:bts.json":  # the complete temp file exists, the entry does not: it is never read
            assert not (run / "eval/bts.json").exists() and list((run / "eval").glob(".bts.json.*.tmp"))
    rc = bts(["--run-dir", str(run)], tmp_path / "log")
    log = (tmp_path / "log").read_text()
    assert rc == 0, log
    assert "Traceback" not in log
    mine, theirs = _fingerprint(run), _fingerprint(reference)
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert mine[key] == theirs[key], key
    assert not (run / "run.lock").exists()


def test_truncated_cached_eval_entry_is_never_trusted(reference, tmp_path):
    """An eval/<method>.json cut short (a copy, a full disk before atomic writes) is re-evaluated, not read."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "stages/evaluate.json").unlink()
    entry = run / "eval/bts.json"
    entry.write_text(entry.read_text()[:40])
    assert bts(["--run-dir", str(run)], tmp_path / "log") == 0, (tmp_path / "log").read_text()
    assert _fingerprint(run)["results"] == _fingerprint(reference)["results"]
    assert "damaged" in (tmp_path / "log").read_text()


def test_truncated_checkpoint_falls_back_through_the_cli(reference, tmp_path):
    """The newest stitch checkpoint is truncated after a crash: the run warns, resumes from the previous one and
    still reproduces the uninterrupted run."""
    run = tmp_path / "run"
    assert bts(["--run-dir", str(run)], tmp_path / "log", fault="stitch:4") == -9
    ckpts = sorted((run / "train/stitch/ckpt").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004"]
    weights = ckpts[-1] / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    assert bts(["--run-dir", str(run)], tmp_path / "log") == 0
    log = (tmp_path / "log").read_text()
    assert "warning: checkpoint" in log and "step-0000004 is damaged" in log
    assert _fingerprint(run) == _fingerprint(reference)


def test_stale_lock_of_a_dead_process_is_taken_over(reference, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    (run / "run.lock").write_text(dead)
    assert bts(["--run-dir", str(run), "--stages", "evaluate"], tmp_path / "log") == 0, (tmp_path / "log").read_text()
    assert not (run / "run.lock").exists()


@pytest.mark.parametrize("content", ["", "garbage"])
def test_unreadable_lock_is_refused_not_ignored(reference, tmp_path, content):
    """A lock whose owner cannot be told is not silently broken (the owner may be writing its pid right now)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(content)
    assert bts(["--run-dir", str(run)], tmp_path / "log") == 2
    log = (tmp_path / "log").read_text().strip().splitlines()
    assert len(log) == 1 and "run.lock" in log[0] and log[0].startswith("bts: error:")


def test_second_run_in_the_same_directory_refuses_while_the_first_is_alive(tmp_path):
    """A live holder (a real process, not a fake pid): the second run exits 2 and writes nothing."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "run.lock").write_text(str(holder.pid))
        rc = bts(["--run-dir", str(run)], tmp_path / "log")
    finally:
        holder.kill()
        holder.wait()
    log = (tmp_path / "log").read_text()
    assert rc == 2 and "Traceback" not in log and f"in use by process {holder.pid}" in log
    assert sorted(p.name for p in run.iterdir()) == ["run.lock"]


# ---- unwritable output ---------------------------------------------------------------------------------------
def test_run_dir_under_a_regular_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert bts(["--run-dir", str(blocker / "run")], tmp_path / "log") == 2
    lines = (tmp_path / "log").read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bts: error:"), lines
    assert str(blocker / "run") in lines[0]
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("fault_errno", [errno.ENOSPC, errno.EROFS])
def test_disk_full_mid_run_is_a_one_line_error_and_nothing_looks_complete(monkeypatch, reference, tmp_path,
                                                                          fault_errno):
    """The disk fills up while evaluation writes its results: one line naming the path, exit 2, and neither the
    failed file nor the stage marker claims completion; freeing space and re-running finishes the run."""
    import shutil

    from bts import atomic

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for f in ("stages/evaluate.json", "results.json", "eval/bts.json"):
        (run / f).unlink()
    real_replace = os.replace

    def full(src, dst):
        if Path(dst).name == "bts.json":
            raise OSError(fault_errno, os.strerror(fault_errno), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full)
    assert bts(["--run-dir", str(run)], tmp_path / "log") == 2
    log = (tmp_path / "log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("bts: error:")]
    assert len(errors) == 1 and "bts.json" in errors[0] and os.strerror(fault_errno) in errors[0], log
    assert log.strip().endswith(errors[0]) and "Traceback" not in log
    assert not (run / "eval/bts.json").exists() and not (run / "stages/evaluate.json").exists()
    assert not (run / "results.json").exists() and not list((run / "eval").glob(".*.tmp"))
    assert not (run / "run.lock").exists()
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert bts(["--run-dir", str(run)], tmp_path / "log") == 0
    assert _fingerprint(run)["results"] == _fingerprint(reference)["results"]


def test_a_run_stored_by_an_older_bts_accepts_options_added_since(tmp_path):
    """Options added to the recipe after a run was made (absent from its recipe.yaml) take their defaults and are
    not a change; a changed value still is."""
    import yaml

    from bts.errors import BTSError
    from bts.pipeline.recipe import load_recipe
    from bts.pipeline.rundir import RunDir

    RunDir(tmp_path).write_manifest(load_recipe("smoke"))
    stored = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    del stored["stitch"]["checkpoint_members"], stored["stitch"]["train"]["compile"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(stored))
    RunDir(tmp_path).write_manifest(load_recipe("smoke"))
    with pytest.raises(BTSError, match="stitch.train.steps"):
        RunDir(tmp_path).write_manifest(load_recipe("smoke", ["stitch.train.steps=99"]))


def test_stale_lock_takeover_is_for_one_process_only(tmp_path):
    """Two runs may both find a crashed run's lock: the one that comes second must see the first's fresh lock
    (not break it), and a takeover in progress is respected."""
    from bts.errors import BTSError
    from bts.pipeline.rundir import RunDir

    run = RunDir(tmp_path)
    lock = tmp_path / "run.lock"
    lock.write_text(str(os.getpid()))  # the other process already took it over: it names a live process now
    with pytest.raises(BTSError, match=f"in use by process {os.getpid()}"):
        run._take_over(lock, dead_pid="999999999")
    assert lock.read_text() == str(os.getpid()) and not (tmp_path / "run.lock.takeover").exists()
    (tmp_path / "run.lock.takeover").write_text("")
    lock.write_text("999999999")
    with pytest.raises(BTSError, match="being taken over"):
        run._take_over(lock, dead_pid="999999999")
    (tmp_path / "run.lock.takeover").unlink()
    os.close(run._take_over(lock, dead_pid="999999999"))  # alone, it takes over
    assert lock.exists() and lock.read_text() == ""
