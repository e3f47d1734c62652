"""experts.paths: given experts are used as they are (not trained, not copied, evaluated, bit-identical after the
run), next to trained ones; bad given members are refused in one sentence before anything is written."""

import json
import subprocess
import sys
from importlib import resources

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bts import BTSError
from bts.core.members import weights_sha256
from bts.pipeline.recipe import load_recipe
from bts.pipeline.run import Run
from helpers import tiny_members, tiny_model, tiny_tokenizer

# A smoke-size run over given members: two fixture domains, code given, math trained from the given seed.
STEPS = ["data.seq_len=32", "data.eval_tokens=256", "stitch.num_stitches=1", "baselines.methods=[soup]",
         "downstream.tasks=[]", "experts.train.steps=3", "stitch.train.steps=3",
         *(f"{phase}.train.{k}" for phase in ("experts", "stitch") for k in ("ckpt_every=2", "log_every=1",
                                                                               "batch_size=4", "warmup=1"))]


def save_with_tokenizer(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    tok = tiny_tokenizer()
    hub, (code,) = tiny_members(n=1, vocab_size=len(tok))
    return save_with_tokenizer(hub, tok, root / "hub"), save_with_tokenizer(code, tok, root / "code"), tok, root


def recipe_for(hub, given: dict, extra=()):
    paths = "{" + ", ".join(f"{d}: '{p}'" for d, p in given.items()) + "}"
    return load_recipe("smoke", ["data.domains={code: {source: fixture}, math: {source: fixture}}",
                                 f"seed_model.path={hub}", f"experts.paths={paths}", *STEPS, *extra])


@pytest.fixture(scope="module")
def given_run(members, tmp_path_factory):
    hub, code, _, _ = members
    before = {f: weights_sha256(f) for f in (hub, code)}
    tensors = load_file(f"{code}/model.safetensors")
    run = Run(recipe_for(hub, {"code": code}), tmp_path_factory.mktemp("run") / "r")
    results = run.all()
    return run, results, before, tensors


def test_given_expert_is_referenced_not_trained_nor_copied(given_run, members):
    run, results, before, tensors = given_run
    hub, code, _, _ = members
    marker = run.done("expert:code")
    assert marker["trained"] is False and marker["path"] == str(run.model_dir("expert-code"))
    assert marker["sha256"] == before[code] and run.done("seed")["sha256"] == before[hub]
    assert not run.path("train", "expert-code").exists() and run.path("train", "expert-math").is_dir()
    # nothing of the given members is in the run directory: no seed or code folder, no weights copied
    assert sorted(p.name for p in run.path("models").iterdir()) == ["bts", "expert-math", "soup"]
    assert "budget" not in marker and run.done("expert:math")["budget"]["steps"] == 3
    # the given members' weights are bit-identical after the run
    assert {f: weights_sha256(f) for f in (hub, code)} == before
    after = load_file(f"{code}/model.safetensors")
    assert after.keys() == tensors.keys() and all(torch.equal(after[k], tensors[k]) for k in tensors)
    # the stitched model references the given folders themselves
    cfg = json.loads(run.path("models", "bts", "config.json").read_text())
    paths = {m["name"]: m["path"] for m in cfg["members"]}
    assert paths["seed"] == str(run.model_dir("seed")) and paths["code"] == marker["path"]
    assert paths["math"] == str(run.path("models", "expert-math").resolve())


def test_given_expert_is_evaluated(given_run, members):
    run, results, _, _ = given_run
    from transformers import AutoModelForCausalLM
    from bts.eval.heldout import heldout_loss
    from bts.data.streams import eval_windows

    assert {"seed", "expert:code", "expert:math", "bts", "soup"} == set(results["methods"])
    entry = results["methods"]["expert:code"]
    assert set(entry["heldout_loss"]) == {"code", "math"}
    # the score is the given model's own: recomputed from its folder, in float64 of the same windows
    model = AutoModelForCausalLM.from_pretrained(members[1], dtype=torch.float32).eval()
    windows = eval_windows(run.stream("code", "heldout"), 32, 256)
    assert entry["heldout_loss"]["code"] == pytest.approx(heldout_loss(model, windows), abs=1e-6)


def test_rerun_skips_and_the_report_has_no_budget_for_given_members(given_run):
    run, results, _, _ = given_run
    again = Run(run.recipe, run.root).all()
    assert again == results
    md = run.path("report", "report.md").read_text()
    budget = md.split("Training budget", 1)[1].split("\n#", 1)[0]
    assert "expert:math" in budget and "expert:code" not in budget and "| seed |" not in budget


# ---- bad input: one sentence, nothing written -------------------------------------------------------------------
def test_a_given_expert_needs_a_given_seed(members):
    with pytest.raises(BTSError, match="experts.paths gives the expert 'code' but seed_model.path is empty"):
        load_recipe("smoke", ["experts.paths={code: /x}"])
    with pytest.raises(BTSError, match="experts.paths names 'poetry', which is not an expert domain"):
        load_recipe("smoke", [f"seed_model.path={members[0]}", "experts.paths={poetry: /x}"])


def test_a_stitch_layout_the_given_seed_cannot_hold_is_refused_before_anything_is_written(members, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(BTSError, match=r"stitch.num_stitches must be at most the 4 layers of seed_model.path"):
        Run(recipe_for(members[0], {"code": members[1]}, ["stitch.num_stitches=5"]), out).all()
    assert not out.exists()


def bad_members(members):
    hub, code, tok, root = members
    if not (root / "wide").exists():
        tiny_model(hidden_size=48, vocab_size=len(tok)).save_pretrained(root / "wide")
        tok.save_pretrained(root / "wide")
        other = tiny_tokenizer(300)
        tiny_model(vocab_size=len(tok)).save_pretrained(root / "othertok")
        other.save_pretrained(root / "othertok")
        (root / "notamodel").mkdir()
        (root / "notamodel" / "README.md").write_text("hello")
        (root / "pickled").mkdir()
        (root / "pickled" / "config.json").write_text((root / "code" / "config.json").read_text())
    return root


@pytest.mark.parametrize("which, fragment", [
    ("notamodel", "experts.paths.code '{p}' has no readable config.json"),
    ("missing", "experts.paths.code path '{p}' is not a model directory"),
    ("pickled", "experts.paths.code '{p}' has no .safetensors weights"),
    ("othertok", "experts.paths.code '{p}': expert 'code' has a different tokenizer from the hub"),
    ("wide", "experts.paths.code '{p}': expert 'code' has hidden_size=48 but the hub has hidden_size=32"),
    ("nobody/not-cached-model", "experts.paths.code '{p}' is neither a local model directory nor a hub id in the "
                                "local cache"),
])
def test_bad_given_expert_is_refused_before_anything_is_written(members, tmp_path, which, fragment):
    root = bad_members(members)
    spec = which if "/" in which else str(root / which)
    out = tmp_path / "run"
    with pytest.raises(BTSError) as err:
        Run(recipe_for(members[0], {"code": spec}), out).all()
    assert str(err.value).startswith(fragment.format(p=spec)), str(err.value)
    assert not out.exists()


def test_bad_given_seed_is_refused_by_the_cli_in_one_line(members, tmp_path):
    recipe = tmp_path / "r.yaml"
    raw = yaml.safe_load(resources.files("bts.recipes").joinpath("smoke.yaml").read_text())
    raw["seed_model"]["path"] = str(bad_members(members) / "notamodel")
    recipe.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bts", "run", str(recipe), "--run-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("bts: error: seed_model.path '") and "has no readable config.json" in lines[0]
    assert not out.exists()


def test_a_given_expert_may_be_a_hub_id_in_the_local_cache(members, tmp_path, monkeypatch):
    """A hub id resolves to its cached snapshot (nothing is downloaded), is checked like a folder, and the marker
    records the snapshot folder and its weights' hash."""
    import shutil

    import huggingface_hub.constants

    from bts.pipeline.given import check_recipe_members, reference

    snapshot = tmp_path / "hub-cache" / "models--local--tiny-code" / "snapshots" / "abc123"
    shutil.copytree(members[1], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    recipe = recipe_for(members[0], {"code": "local/tiny-code"})
    check_recipe_members(recipe)
    run = Run(recipe, tmp_path / "run")
    assert run.model_dir("expert-code") == snapshot and run.model_dir("expert-math") == run.path("models",
                                                                                                "expert-math")
    assert reference("local/tiny-code", "experts.paths.code") == {
        "trained": False, "given": "local/tiny-code", "path": str(snapshot.resolve()),
        "sha256": weights_sha256(members[1])}
    assert not (tmp_path / "run").exists()
