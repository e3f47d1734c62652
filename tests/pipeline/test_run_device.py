"""A pipeline run's device: resolved once when the run starts, before anything is written; an explicit CPU is
bit-identical to a run with the device unset (and today's dtype default to the old one); a GPU that torch reports
is really used by the first training stage and by evaluation; where a run computes may change between resumes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import TINY, fake_gpus

from bts.errors import BTSError
from bts.pipeline import stages
from bts.pipeline.recipe import load_recipe, recipe_to_dict
from bts.pipeline.rundir import RunDir
from bts.pipeline.run import Run, load_run

CUDA_MISSING = "Torch not compiled with CUDA enabled"
SMALL = [*TINY, "baselines.methods=[]"]
UP_TO_EVAL = ["data", "tokenizer", "seed", "experts", "stitch", "evaluate"]



def losses(run, phase):
    return [json.loads(line)["loss"] for line in run.path("train", phase, "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same small run twice: device unset with every phase's dtype float32 (the recipe as it was before
    devices), and device=cpu with today's defaults (dtype auto, members_dtype auto)."""
    root = tmp_path_factory.mktemp("device")
    old = [*SMALL, *(f"{p}.train.dtype=float32" for p in ("seed_model", "experts", "stitch"))]
    a = Run(load_recipe("smoke", old), root / "unset")
    b = Run(load_recipe("smoke", [*SMALL, "device=cpu"]), root / "cpu")
    a.all(UP_TO_EVAL)
    b.all(UP_TO_EVAL)
    return a, b


def test_explicit_cpu_is_bit_identical(two_runs):
    a, b = two_runs
    for phase in ("seed", "expert-code", "expert-math", "stitch"):
        assert losses(a, phase) == losses(b, phase), phase  # exact floats, step by step
    ra, rb = (json.loads(r.path("results.json").read_text()) for r in (a, b))
    for method in ra["methods"]:
        assert ra["methods"][method]["heldout_loss"] == rb["methods"][method]["heldout_loss"], method
    from safetensors.torch import load_file

    sa, sb = (load_file(r.path("models", "bts", "stitch.safetensors")) for r in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cuda_where_there_is_none_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = Run(load_recipe("smoke", [*SMALL, "device=cuda:1"]), tmp_path / "run")
    with pytest.raises(BTSError, match=r"device is 'cuda:1' but torch .* sees no CUDA GPU") as exc:
        run.all()
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "run").exists()


def test_a_reported_gpu_is_used_by_the_first_training_stage(monkeypatch, tmp_path):
    fake_gpus(monkeypatch)
    run = Run(load_recipe("smoke", SMALL), tmp_path / "run")  # device: auto
    assert run.device == torch.device("cuda", 0) and run.members_dtype is torch.bfloat16
    with pytest.raises(AssertionError, match=CUDA_MISSING):
        run.all(["data", "tokenizer", "seed"])
    assert run.done("tokenizer") and not run.done("seed")  # the seed stage tried the GPU and did not finish


def test_a_reported_gpu_is_used_by_evaluation_and_the_stitch(monkeypatch, two_runs):
    """Every evaluated model and the stitch stage's members are read onto the GPU in bf16."""
    _, b = two_runs
    fake_gpus(monkeypatch)
    run = load_run(b.root)
    run.recipe.device = "auto"
    found = stages.methods(run)
    assert {"seed", "expert:code", "bts"} <= set(found)
    with pytest.raises(AssertionError, match=CUDA_MISSING):
        found["seed"][0]()
    with pytest.raises(BTSError, match=CUDA_MISSING):  # a member that cannot be read is one sentence
        found["bts"][0]()
    with pytest.raises(BTSError, match=CUDA_MISSING):
        run.build_stitched()


def test_under_torchrun_each_rank_takes_its_own_gpu(monkeypatch, tmp_path):
    fake_gpus(monkeypatch, n=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Run(load_recipe("smoke", [*SMALL, "device=cuda:0"]), tmp_path).device == torch.device("cuda", 1)
    assert Run(load_recipe("smoke", [*SMALL, "device=cpu"]), tmp_path).device == torch.device("cpu")


def test_where_a_run_computes_may_change_between_resumes(tmp_path):
    d = RunDir(tmp_path)
    d.write_manifest(load_recipe("smoke", ["device=cpu"]))
    d.write_manifest(load_recipe("smoke", ["device=auto"]))  # not a changed recipe
    with pytest.raises(BTSError, match="was made with members_dtype='auto', not 'float32'"):
        d.write_manifest(load_recipe("smoke", ["members_dtype=float32"]))  # what it computes: a changed recipe


def test_a_run_made_before_devices_resumes_with_todays_defaults(tmp_path):
    """Its recipe.yaml has no device keys and dtype float32 (the old default, which on its CPU meant "auto")."""
    stored = recipe_to_dict(load_recipe("smoke"))
    for key in ("device", "members_dtype"):
        del stored[key]
    for section in ("seed_model", "experts", "stitch"):
        stored[section]["train"]["dtype"] = "float32"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    RunDir(tmp_path).write_manifest(load_recipe("smoke"))
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["device"] == "auto"
    with pytest.raises(BTSError, match="seed_model.train.dtype='auto', not 'bfloat16'"):  # a real change still is
        RunDir(tmp_path).write_manifest(load_recipe("smoke", ["seed_model.train.dtype=bfloat16"]))
