"""LoRA experts in the pipeline (experts.lora): a run completes with plain merged experts, a kill mid-expert then
the same command reproduces the uninterrupted run bit for bit, and bad LoRA settings are refused before anything is
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, tiny_model, tiny_tokenizer

from bts import BTSError
from bts.cli.child import run_cli
from bts.pipeline.recipe import load_recipe

LORA = ["experts.lora.r=4", "experts.lora.alpha=8", "baselines.methods=[soup]", "stitch.train.steps=2"]


def bts(run: Path, log: Path, *extra, fault=None):
    return run_cli(["run", "smoke", *TINY, *LORA, *extra, "--run-dir", str(run)], log, fault=fault)


def _weights(run: Path) -> dict:
    out = {str(f.relative_to(run)): f.read_bytes() for f in sorted((run / "models").rglob("*.safetensors"))}
    for f in sorted((run / "train").glob("expert-*/metrics.jsonl")):
        out[str(f.relative_to(run))] = [{k: v for k, v in json.loads(x).items() if k != "tok_per_s"}
                                        for x in f.read_text().splitlines()]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    assert bts(root / "run", root / "log") == 0, (root / "log").read_text()[-3000:]
    return root / "run"


def test_lora_run_completes_with_plain_merged_experts(reference):
    from safetensors.torch import load_file

    results = json.loads((reference / "results.json").read_text())
    assert {"seed", "expert:code", "expert:math", "bts", "soup"} <= set(results["methods"])
    seed = load_file(reference / "models/seed/model.safetensors")
    for d in ("code", "math"):
        expert = load_file(reference / f"models/expert-{d}/model.safetensors")
        assert expert.keys() == seed.keys()  # no adapter tensors: an ordinary checkpoint of the seed's shape
        marker = json.loads((reference / f"stages/expert-{d}.json").read_text())
        assert marker["trained_params"] == marker["lora_params"] < marker["params"] / 4
        assert results["methods"][f"expert:{d}"]["trainable_params"] == marker["trained_params"]  # the report's
        # by default LoRA leaves the embeddings and head as the seed's, bit for bit (experts.train_embeddings, on by
        # default, is for full training); the blocks moved
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(expert[k], seed[k]), k
        assert not torch.equal(expert["model.layers.0.self_attn.q_proj.weight"],
                               seed["model.layers.0.self_attn.q_proj.weight"])
        # the adapter lr: LR_SCALE × experts.train.lr unless experts.lora.lr is given
        assert marker["budget"]["lr"] == pytest.approx(10 * load_recipe("smoke").experts.train.lr)


def test_lora_train_embeddings_trains_embeddings_and_head_in_full(tmp_path):
    from safetensors.torch import load_file

    from bts.pipeline.run import Run

    recipe = load_recipe("smoke", [*TINY, *LORA, "experts.lora.train_embeddings=true", "experts.domains=[code]"])
    Run(recipe, tmp_path / "run").all(["data", "tokenizer", "seed", "experts"])
    seed = load_file(tmp_path / "run/models/seed/model.safetensors")
    expert = load_file(tmp_path / "run/models/expert-code/model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(expert[k], seed[k]), k
    marker = json.loads((tmp_path / "run/stages/expert-code.json").read_text())
    assert marker["trained_params"] == marker["lora_params"] + seed["model.embed_tokens.weight"].numel() * 2


def test_kill_mid_lora_expert_then_rerun_equals_uninterrupted(reference, tmp_path):
    run = tmp_path / "run"
    for fault in ("expert:code:3", "expert:math:4"):  # mid-way; after the last checkpoint, before the merge
        assert bts(run, tmp_path / "log", fault=fault) == -9, (tmp_path / "log").read_text()[-2000:]
    assert bts(run, tmp_path / "log") == 0, (tmp_path / "log").read_text()[-2000:]
    mine, theirs = _weights(run), _weights(reference)
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert mine[key] == theirs[key], key


def _refused(tmp_path, argv):
    log = tmp_path / "log"
    assert run_cli(argv, log) == 2
    text = log.read_text().strip()
    assert text.startswith("bts: error: ") and "\n" not in text and "Traceback" not in text, text
    assert not (tmp_path / "run").exists()  # nothing written
    return text


def test_a_target_the_scratch_seed_lacks_is_refused_before_anything_is_written(tmp_path):
    text = _refused(tmp_path, ["run", "smoke", *TINY, *LORA, "experts.lora.targets=[q_proj, qkv_proj]",
                               "--run-dir", str(tmp_path / "run")])
    assert "experts.lora.targets" in text and "'qkv_proj'" in text and "down_proj" in text


def test_a_target_a_given_seed_lacks_is_refused_before_anything_is_written(tmp_path):
    tiny_model("phi3").save_pretrained(tmp_path / "phi3")  # fused qkv_proj / gate_up_proj: no q_proj
    tiny_tokenizer().save_pretrained(tmp_path / "phi3")  # a given seed needs its tokenizer (the run's)
    text = _refused(tmp_path, ["run", "smoke", *TINY, *LORA, f"seed_model.path={tmp_path / 'phi3'}",
                               "--run-dir", str(tmp_path / "run")])
    assert "'q_proj'" in text and "qkv_proj" in text and "Phi3ForCausalLM" in text


@pytest.mark.parametrize("override, fragment", [
    ("experts.lora.r=-1", "experts.lora.r"),
    ("experts.lora.alpha=0", "experts.lora.alpha"),
    ("experts.lora.dropout=1", "experts.lora.dropout"),
    ("experts.lora.lr=-1e-3", "experts.lora.lr"),
    ("experts.lora.targets=[]", "experts.lora.targets"),
    ("experts.lora.targets=[q_proj, q_proj]", "twice"),
    ("experts.lora.rank=4", "known: r, alpha"),
])
def test_bad_lora_settings_are_refused_at_load(override, fragment):
    with pytest.raises(BTSError, match=fragment):
        load_recipe("smoke", [override])


def test_lora_is_off_by_default_and_the_lr_rule_applies_only_when_on():
    r = load_recipe("smoke")
    assert r.experts.lora.r == 0 and r.experts.train_config() is r.experts.train
    on = load_recipe("smoke", ["experts.lora.r=8", "experts.lora.lr=3e-3"])
    assert on.experts.train_config().lr == 3e-3 and on.experts.train_config().steps == on.experts.train.steps
