"""Recipes: built-ins load, overrides apply, and every bad value is a one-sentence error naming the key."""

import pytest

from bts import BTSError
from bts.pipeline.recipe import builtin_recipes, load_recipe
from bts.pipeline.study import is_study


def test_builtin_recipes_load():
    assert {"smoke", "demo"} <= set(builtin_recipes())
    for name in builtin_recipes():
        if is_study(name):  # a study over a base recipe (tests/pipeline/test_study.py)
            continue
        r = load_recipe(name)
        assert r.data.domains and r.expert_domains


def test_dotted_overrides_are_typed():
    r = load_recipe("smoke", ["stitch.train.steps=7", "stitch.init=bias", "stitch.train.lr=0.5"])
    assert r.stitch.train.steps == 7 and r.stitch.init == "bias" and r.stitch.train.lr == 0.5


@pytest.mark.parametrize("override, fragment", [
    ("stitch.train.stpes=3", "did you mean 'steps'"),
    ("stitch.train.steps=-1", "stitch.train.steps must be positive (got -1)"),
    ("stitch.train.lr=0", "stitch.train.lr must be positive (got 0"),
    ("stitch.train.steps=abc", "stitch.train.steps must be of type int (got 'abc')"),
    ("stitch.gate_dropout=1.5", "stitch.gate_dropout must be in [0, 1) (got 1.5)"),
    ("stitch.domain_weights={code: -1}", "stitch.domain_weights.code must be positive (got -1)"),
    ("stitch.domain_weights={nope: 1}", "'nope'"),
    ("experts.domains=[nope]", "experts.domains names 'nope'"),
    ("data.domains.code.source=ftp", "data.domains.code.source must be builtin, fixture, files or hf (got 'ftp')"),
    ("data.seq_len=0", "data.seq_len must be positive (got 0)"),
    ("seed_model.train.dtype=float16", "seed_model.train.dtype must be auto, float32 or bfloat16 (got 'float16')"),
    ("stitch.train.batch_size=5", "must be a multiple of grad_accum"),
    ("data.split_fractions=[1, 0, 0]", "data.split_fractions"),
    ("nonsense", "must look like key.sub=value"),
    ("modularity.add_fraction=0", "modularity.add_fraction must be in (0, 1] (got 0"),
    ("modularity.retrain_fraction=1.5", "modularity.retrain_fraction must be in (0, 1] (got 1.5)"),
    ("modularity.focus_weight=1", "modularity.focus_weight must be in [0, 1) (got 1"),
    ("modularity.enabled=3", "modularity.enabled must be of type bool (got 3)"),
    ("modularity.sprase=false", "did you mean 'sparse'"),
    ("device=gpu", "device must be auto, cpu, cuda or cuda:N (got 'gpu')"),
    ("device=cuda:x", "device must be auto, cpu, cuda or cuda:N (got 'cuda:x')"),
    ("members_dtype=fp8", "members_dtype must be one of auto, float32, bfloat16, float16 (got 'fp8')"),
])
def test_bad_values_name_the_key(override, fragment):
    if "batch_size=5" in override:
        overrides = [override, "stitch.train.grad_accum=2"]
    else:
        overrides = [override]
    with pytest.raises(BTSError) as err:
        load_recipe("smoke", overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_modularity_section():
    assert not load_recipe("smoke").modularity.enabled and not load_recipe("demo").modularity.enabled
    assert load_recipe("modularity").modularity.enabled
    with pytest.raises(BTSError) as err:
        load_recipe("smoke", ["modularity.enabled=true", "experts.domains=[code]"])
    assert "modularity.enabled needs at least 2 experts" in str(err.value) and "\n" not in str(err.value)


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(BTSError, match="neither a YAML file nor a built-in recipe"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(BTSError, match="not valid YAML"):
        load_recipe(str(bad))


def test_recipe_values_are_never_evaluated(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(BTSError):
        load_recipe(str(evil))


@pytest.mark.parametrize("override, fragment", [
    ("stitch.init=blnd", "stitch.init must be one of"),
    ("stitch.expert_stream=x", "stitch.expert_stream must be one of"),
    ("stitch.output=heads", "stitch.output must be one of hub, mix_hidden, mix_logprobs (got 'heads')"),
    ("stitch.beta=-1", "stitch.beta must be a positive finite number (got -1.0)"),
    ("stitch.positions=[1.5]", "stitch.positions"),
    ("baselines.methods=[soup, nope]", "baselines.methods names 'nope', which is not a baseline"),
    ("baselines.methods=[soup, soup]", "baselines.methods names 'soup' twice"),
    ("baselines.merge_lambda=0", "baselines.merge_lambda=0.0 must be a finite number > 0"),
    ("baselines.ties_density=1.5", "baselines.ties_density=1.5 must be in (0, 1]"),
    ("baselines.dare_drop_rate=1", "baselines.dare_drop_rate=1.0 must be in [0, 1)"),
    ("baselines.btx_lr=-1", "baselines.btx_lr must be positive (got -1"),
    ("baselines.btx_trainable=lora", "baselines.btx_trainable 'lora' is not one of full, router"),
    ("baselines.routing_lr=.inf", "baselines.routing_lr must be finite (got inf)"),
    ("baselines.sweep=3", "baselines.sweep must be of type bool (got 3)"),
    ("downstream.tasks=[nope]", "downstream.tasks names 'nope', which is not a task"),
    ("downstream.fewshot=-1", "downstream.fewshot must be ≥ 0 (got -1)"),
    ("experts.domains=[code, code]", "experts.domains names 'code' twice"),
    ("experts.train.weight_decay=-0.1", "experts.train.weight_decay must be ≥ 0 (got -0.1)"),
    ("stitch.train.clip=.nan", "stitch.train.clip must be ≥ 0 (got nan)"),
    ("seed_model.num_heads=3", "seed_model.hidden_size (64) must be a multiple of seed_model.num_heads (3)"),
    ("seed_model.num_kv_heads=0", "seed_model.num_kv_heads must be positive (got 0)"),
    ("tokenizer.train_chars=0", "tokenizer.train_chars must be positive (got 0)"),
    ("data.split_fractions=[0.8, 0.1, 0.2]", "data.split_fractions must be three non-negative numbers summing to 1"),
    ("data.eval_tokens=-1", "data.eval_tokens must be ≥ 0"),
    ("data.domains.code.max_chars=-1", "data.domains.code.max_chars must be ≥ 0"),
    ("data.domains.code={source: hf}", "data.domains.code.dataset is empty but source is 'hf'"),
    ("data.domains.code={source: files, files: [3]}", "data.domains.code.files must list paths or globs (got 3)"),
])
def test_every_value_is_checked_at_load(override, fragment):
    """Each of these loaded fine before and failed at its stage (or never): now refused at load, naming the key."""
    with pytest.raises(BTSError) as err:
        load_recipe("smoke", [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_an_output_mix_is_refused_with_the_modularity_stage():
    """Adding / removing experts rebuilds the stitches only: refused at load, not after the stitch has trained."""
    with pytest.raises(BTSError) as err:
        load_recipe("smoke", ["stitch.output=mix_hidden", "modularity.enabled=true"])
    assert "stitch.output=mix_hidden cannot be combined with modularity.enabled" in str(err.value)
    assert load_recipe("smoke", ["stitch.output=mix_logprobs"]).stitch.output == "mix_logprobs"


def test_every_baseline_option_belongs_to_a_baseline_and_is_checked():
    """Each `baselines.*` key but `methods` is read by some registered baseline, which checks it (the recipe
    holds no baseline check of its own); the trained ones say their training phase."""
    import dataclasses

    from bts.baselines.registry import REGISTRY
    from bts.pipeline.recipe import BaselinesConfig

    declared = {key for b in REGISTRY.values() for key in b.options}
    assert declared == {f.name for f in dataclasses.fields(BaselinesConfig)} - {"methods"}
    r = load_recipe("smoke")
    assert list(REGISTRY) == r.baselines.methods  # the paper's order, as the smoke recipe lists them
    for b in REGISTRY.values():
        assert (b.budget(r) is not None) == b.trained


@pytest.mark.parametrize("override, needle", [
    ("stitch.init=blnd", "stitch.init"),
    ("stitch.output=heads", "stitch.output"),
    ("baselines.methods=[btx_top3]", "baselines.methods"),
    ("baselines.btx_trainable=lora", "baselines.btx_trainable"),
])
def test_bad_value_through_the_cli_writes_nothing(tmp_path, override, needle):
    from helpers import TINY

    from bts.cli.child import run_cli

    run_dir, log = tmp_path / "run", tmp_path / "log"
    rc = run_cli(["run", "smoke", "--run-dir", str(run_dir), *TINY, override], log)
    lines = log.read_text().strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not run_dir.exists() or not any(run_dir.rglob("*"))


def test_mixed_docs_accepts_a_bare_yaml_off(tmp_path):
    """`data.mixed_docs: off` is YAML for false; it means off, in a file and as an override."""
    assert load_recipe("smoke").data.mixed_docs == "auto"
    assert load_recipe("smoke", ["data.mixed_docs=off"]).data.mixed_docs == "off"
    assert load_recipe("smoke", ["data.mixed_docs=fixture"]).data.mixed_docs == "fixture"
    for bad in ("0", "web"):
        with pytest.raises(BTSError, match="data.mixed_docs must be"):
            load_recipe("smoke", [f"data.mixed_docs={bad}"])
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndata:\n  mixed_docs: off\n  domains:\n    code: {source: fixture}\n")
    assert load_recipe(str(path)).data.mixed_docs == "off"
