"""Recipes: built-ins load, overrides apply, and every bad value is a one-sentence error naming the key."""

import pytest

from bts import BTSError
from bts.pipeline.recipe import builtin_recipes, load_recipe


def test_builtin_recipes_load():
    assert {"smoke", "demo"} <= set(builtin_recipes())
    for name in builtin_recipes():
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
    ("seed_model.train.dtype=float16", "seed_model.train.dtype must be float32 or bfloat16 (got 'float16')"),
    ("stitch.train.batch_size=5", "must be a multiple of grad_accum"),
    ("data.split_fractions=[1, 0, 0]", "data.split_fractions"),
    ("nonsense", "must look like key.sub=value"),
    ("modularity.add_fraction=0", "modularity.add_fraction must be in (0, 1] (got 0"),
    ("modularity.retrain_fraction=1.5", "modularity.retrain_fraction must be in (0, 1] (got 1.5)"),
    ("modularity.focus_weight=1", "modularity.focus_weight must be in [0, 1) (got 1"),
    ("modularity.enabled=3", "modularity.enabled must be of type bool (got 3)"),
    ("modularity.sprase=false", "did you mean 'sparse'"),
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
