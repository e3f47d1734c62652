"""A given seed's card (seed.json next to its weights: how it was trained) is copied into the seed stage's marker,
so the report reads the run directory alone; a damaged card is refused before anything is written."""

import json

import pytest
from helpers import tiny_model, tiny_tokenizer

from bts import BTSError
from bts.pipeline.recipe import load_recipe
from bts.pipeline.run import Run

CARD = {"tokens": 123_456, "steps": 30, "batch_size": 16, "seq_len": 32, "lr": 3e-3, "min_lr_ratio": 0.1,
        "recipe": "seed", "curve": [{"step": 10, "tokens": 5120, "val_avg": 6.25, "val_loss": {"code": 6.25}}]}


@pytest.fixture
def seed_dir(tmp_path):
    tok = tiny_tokenizer()
    folder = tmp_path / "seed"
    tiny_model(vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _recipe(folder):
    return load_recipe("smoke", ["data.domains={code: {source: fixture}, math: {source: fixture}}",
                                 f"seed_model.path={folder}", "data.seq_len=32", "stitch.num_stitches=1"])


def test_the_card_of_a_given_seed_is_copied_into_its_marker(seed_dir, tmp_path):
    (seed_dir / "seed.json").write_text(json.dumps(CARD))
    run = Run(_recipe(seed_dir), tmp_path / "run")
    run.all(only=["data", "tokenizer", "seed"])
    marker = run.done("seed")
    assert marker["card"] == CARD and marker["trained"] is False and marker["path"] == str(seed_dir.resolve())
    assert "budget" not in marker  # not trained in the run


def test_a_given_seed_without_a_card_has_none(seed_dir, tmp_path):
    run = Run(_recipe(seed_dir), tmp_path / "run")
    run.all(only=["data", "tokenizer", "seed"])
    marker = run.done("seed")
    assert "card" not in marker and marker["trained"] is False


@pytest.mark.parametrize("text", ["{not json", json.dumps({**CARD, "tokens": "many"}), json.dumps([1, 2])])
def test_a_damaged_card_is_refused_before_anything_is_written(seed_dir, tmp_path, text):
    (seed_dir / "seed.json").write_text(text)
    out = tmp_path / "run"
    with pytest.raises(BTSError, match=rf"^seed_model.path '{seed_dir}': seed.json (is not readable JSON|needs)"):
        Run(_recipe(seed_dir), out).all()
    assert not out.exists()
