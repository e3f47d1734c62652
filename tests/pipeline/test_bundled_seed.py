"""The demo's bundled seed (src/bts/seeds/demo, trained by the `seed` recipe) and the regime the demo keeps: the
shipped files are the ones the card hashed, the seed's shape and tokenizer are the recipe's, the demo holds out only
groups the seed never trained on, its budgets keep the paper's proportions, and the seed recipe is deterministic."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from bts.cli.child import run_cli
from bts.core.members import resolve_dir
from bts.core.bundled import bundled_names, bundled_seed
from bts.errors import BTSError
from bts.pipeline.given import seed_card
from bts.pipeline.recipe import load_recipe

FOLDER = bundled_seed("demo")
CARD = seed_card("bundled:demo")


def test_the_shipped_files_are_the_ones_the_card_hashed():
    assert bundled_names() == ["demo"]
    for name, digest in CARD["sha256"].items():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == digest, name


def test_bundled_names_resolve_and_an_unknown_one_is_one_sentence():
    assert resolve_dir("bundled:demo", "seed_model.path") == FOLDER
    with pytest.raises(BTSError, match=r"^seed_model.path 'bundled:nope' names no seed shipped with bts "
                                       r"\(shipped: bundled:demo\)\.$"):
        resolve_dir("bundled:nope", "seed_model.path")


def test_the_bundled_seed_is_the_seed_recipes_shape_and_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    seed = load_recipe("seed")
    config = AutoConfig.from_pretrained(FOLDER)
    s = seed.seed_model
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size) == (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads,
                                          s.intermediate_size)
    assert len(AutoTokenizer.from_pretrained(FOLDER)) == config.vocab_size == seed.tokenizer.vocab_size
    weights = load_file(FOLDER / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert CARD["tokens"] == s.train.steps * s.train.batch_size * seed.data.seq_len


def test_the_demo_holds_out_only_groups_the_seed_never_trained_on():
    """split_mask splits the whole corpus by group before capping (tests/data/test_corpora.py checks that a
    group's split never depends on the cap): the same corpora, fractions and split seed, read in full by the seed
    recipe, make the demo's validation and held-out groups the seed's too."""
    demo, seed = load_recipe("demo"), load_recipe("seed")
    assert demo.seed_model.path == "bundled:demo"
    assert list(demo.data.domains) == list(seed.data.domains)
    for d, spec in demo.data.domains.items():
        assert spec.source == seed.data.domains[d].source == "builtin"
        assert seed.data.domains[d].max_chars == 0  # read in full
    assert demo.data.split_fractions == seed.data.split_fractions
    assert demo.data.split_seed == seed.data.split_seed == CARD["data"]["split_seed"]
    assert demo.data.seq_len == seed.data.seq_len


def test_the_demo_keeps_the_papers_proportions():
    """Fixed before the demo ran (docs/regime.md): the seed sees at least 20x an expert's tokens, experts start
    from the seed's final learning rate, and the stitch and every trained baseline get at most 1/5 of an
    expert's tokens, the same for all of them."""
    from bts.baselines.registry import REGISTRY

    demo = load_recipe("demo")
    tokens = lambda cfg: cfg.steps * cfg.batch_size * cfg.grad_accum * demo.data.seq_len  # noqa: E731
    expert = tokens(demo.experts.train)
    assert CARD["tokens"] >= 20 * expert
    assert demo.experts.train.lr == pytest.approx(CARD["final_lr"])
    stitch = tokens(demo.stitch.train)
    assert 5 * stitch <= expert
    trained = [m for m in demo.baselines.methods if REGISTRY[m].budget(demo) is not None]
    assert {"btx_top2", "btx_soft", "bam", "bam_adapters", "routing"} <= set(trained)
    assert {tokens(REGISTRY[m].budget(demo)) for m in trained} == {stitch}


def test_the_seed_recipe_is_deterministic(tmp_path):
    """Two runs of the seed recipe (on the committed fixtures, a few steps) write byte-identical weights."""
    args = ["seed", *(f"data.domains.{d}.source=fixture" for d in ("code", "prose", "math", "legal")),
            "tokenizer.vocab_size=300", "tokenizer.train_chars=50000", "seed_model.train.steps=3",
            "seed_model.train.batch_size=4", "seed_model.train.log_every=1", "seed_model.val_tokens=256", "data.eval_tokens=512",
            "--stages", "data,tokenizer,seed"]
    digests = []
    for k in range(2):
        run = tmp_path / f"run{k}"
        assert run_cli(["run", *args, "--run-dir", str(run)], tmp_path / f"log{k}") == 0, \
            (tmp_path / f"log{k}").read_text()[-2000:]
        digests.append(hashlib.sha256((run / "models" / "seed" / "model.safetensors").read_bytes()).hexdigest())
        curve = [json.loads(x) for x in (run / "train" / "seed" / "metrics.jsonl").read_text().splitlines()]
        assert all(set(c["val_loss"]) == {"code", "prose", "math", "legal"} for c in curve)
    assert digests[0] == digests[1]


@pytest.mark.parametrize("override, value", [("data.split_seed=1", "1"), ("data.split_fractions=[0.7,0.2,0.1]", "")])
def test_another_split_of_the_seeds_corpora_is_refused_writing_nothing(tmp_path, override, value):
    """The demo's held-out groups are the seed's only under the seed's own split: another split seed or other
    fractions over the same built-in corpora would score text the seed trained on."""
    run = tmp_path / "run"
    code = run_cli(["run", "demo", override, "--run-dir", str(run)], tmp_path / "log")
    text = (tmp_path / "log").read_text()
    assert code == 2 and "seed_model.path 'bundled:demo' was trained with" in text, text[-1500:]
    assert "or the held-out text may be text the seed trained on." in text
    assert not run.exists()
