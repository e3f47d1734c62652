"""The real-family recipes (Qwen2.5 + Coder + Math, Llama-3.2 + FineMath, gemma + codegemma) and the shapes bts ships
for them, offline: the shipped configs are the published shapes; each recipe plans with its own members; shrunk
random members of each shipped config stitch (starting as the hub, causal, each member keeping its own rotary
settings); and a recipe whose checkpoints are not cached is refused in one sentence before anything is written.
"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, assert_causal, open_stitches, random_ids, save_members, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from bts import BTSError, BTSForCausalLM
from bts.cli import main
from bts.core import hf
from bts.core.plan import load_arch
from bts.core.shipped import HUB_IDS, member_config, shipped_dir, shipped_names
from bts.pipeline.recipe import load_recipe
from bts.pipeline.recipe_plan import recipe_plan

RECIPES = {  # recipe -> (hub, {domain: expert})
    "qwen2.5-1.5b-code-math": ("Qwen/Qwen2.5-1.5B", {"code": "Qwen/Qwen2.5-Coder-1.5B",
                                                      "math": "Qwen/Qwen2.5-Math-1.5B"}),
    "llama-3.2-3b-finemath": ("meta-llama/Llama-3.2-3B", {"math": "HuggingFaceTB/FineMath-Llama-3B"}),
    "gemma-2b-code": ("google/gemma-2b", {"code": "google/codegemma-2b"}),
}

# The published config.json values (src/bts/configs/README.md names the source of each): model_type, hidden, layers,
# heads, kv heads, FFN, vocab, tied, rope θ, positions; and the parameter count bts counts on the meta device
# (the model cards round it: Qwen2.5-0.5B 0.49B, -1.5B 1.54B, Llama-3.2-3B 3.21B, gemma-2b 2.51B).
PUBLISHED = {
    "qwen2.5-0.5b": ("qwen2", 896, 24, 14, 2, 4864, 151936, True, 1e6, 32768, 494_032_768),
    "qwen2.5-1.5b": ("qwen2", 1536, 28, 12, 2, 8960, 151936, True, 1e6, 131072, 1_543_714_304),
    "qwen2.5-coder-1.5b": ("qwen2", 1536, 28, 12, 2, 8960, 151936, True, 1e6, 32768, 1_543_714_304),
    "qwen2.5-math-1.5b": ("qwen2", 1536, 28, 12, 2, 8960, 151936, True, 1e4, 4096, 1_543_714_304),
    "llama-3.2-3b": ("llama", 3072, 28, 24, 8, 8192, 128256, True, 5e5, 131072, 3_212_749_824),
    "finemath-llama-3b": ("llama", 3072, 28, 24, 8, 8192, 128256, True, 5e5, 4096, 3_212_749_824),
    "gemma-2b": ("gemma", 2048, 18, 8, 1, 16384, 256000, True, 1e4, 8192, 2_506_172_416),
    "codegemma-2b": ("gemma", 2048, 18, 8, 1, 16384, 256000, True, 1e4, 8192, 2_506_172_416),
}


def _rope(config) -> dict:
    return dict(config.rope_parameters)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shipped_configs_are_the_published_shapes_and_supported(name):
    config = AutoConfig.from_pretrained(shipped_dir(name))
    hf.check_supported(config)
    arch = load_arch(name)
    got = (config.model_type, arch.d, arch.layers, arch.heads, arch.kv_heads, arch.ffn, arch.vocab, arch.tied,
           _rope(config)["rope_theta"], config.max_position_embeddings, arch.total)
    assert got == PUBLISHED[name]
    assert load_arch([h for h, n in HUB_IDS.items() if n == name][0]).total == arch.total  # by hub id too


def test_every_hub_id_has_a_shipped_config_and_every_recipe_member_a_hub_id():
    assert all(shipped_dir(h) is not None for h in HUB_IDS)
    assert set(PUBLISHED) <= set(shipped_names())
    for hub, experts in RECIPES.values():
        assert {hub, *experts.values()} <= set(HUB_IDS)
    llama3 = _rope(AutoConfig.from_pretrained(shipped_dir("finemath-llama-3b")))
    assert llama3["rope_type"] == "llama3" and llama3["factor"] == 32.0  # the scaling is kept, not dropped


def _not_cached(monkeypatch):
    """As on a machine without the weights: every hub id misses the cache."""
    import bts.core.members as members

    def missing(spec, role):
        raise BTSError(f"{role} '{spec}' is neither a local model directory nor a hub id in the local cache.")
    monkeypatch.setattr(members, "load_config", missing)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_recipe_loads_and_plans_offline_with_its_own_members(name, monkeypatch, capsys):
    _not_cached(monkeypatch)
    hub, experts = RECIPES[name]
    recipe = load_recipe(name)
    assert recipe.seed_model.path == hub and recipe.experts.paths == experts
    assert recipe.expert_domains == list(experts)  # only the given experts: none is trained from the seed
    assert recipe.baselines.methods == [] and recipe.device == "auto"
    assert set(recipe.data.domains) == {"general", *experts}
    assert all(d.source == "hf" and d.dataset for d in recipe.data.domains.values())
    plan = recipe_plan(recipe)
    assert plan["experts"] == len(experts) and plan["gpus"] == 1
    assert plan["seq"] == recipe.data.seq_len
    assert plan["micro_batch"] == recipe.stitch.train.batch_size // recipe.stitch.train.grad_accum
    assert plan["arch"] == load_arch(hub) and f"shipped config {HUB_IDS[hub]}" in plan["source"]
    stitch = next(p for p in plan["phases"] if p.name == "stitch training")
    assert stitch.fits["ddp"]  # the recipe's micro-batch fits one 80 GiB device, by bts's own estimate
    assert load_recipe(f"recipes/{name}.yaml") == recipe  # the path the docs use works from anywhere
    assert main(["plan", name]) == 0
    assert f"recipe {name}: hub {hub}" in capsys.readouterr().out


def test_a_recipe_with_a_local_hub_plans_with_that_models_own_config(tmp_path):
    hub_dir, _ = save_members(tmp_path, "qwen2", 1)
    plan = recipe_plan(load_recipe("qwen2.5-1.5b-code-math", [f"seed_model.path={hub_dir}"]))
    assert (plan["arch"].d, plan["arch"].layers, plan["experts"]) == (32, 4, 2)
    assert f"from {hub_dir}" in plan["source"]


def test_plan_of_a_config_still_needs_experts(capsys):
    assert main(["plan", "qwen2.5-1.5b"]) == 2
    assert "--experts is required" in capsys.readouterr().err
    assert main(["plan", "Qwen/Qwen2.5-1.5B", "--experts", "2"]) == 0


def test_member_config_names_what_is_neither_cached_nor_shipped(monkeypatch):
    _not_cached(monkeypatch)
    with pytest.raises(BTSError, match="'someone/unknown-7b' is neither"):
        member_config("someone/unknown-7b", "seed_model.path")


def _shrunk(spec: str, seed: int, dtype=torch.float64):
    """A random model of the shipped config of `spec`, shrunk (4 layers, head_dim 8, one KV head, the published
    query:KV head ratio, a 97-token vocabulary) with every other field as published (rotary θ and scaling,
    positions, norms, activation, tied embeddings)."""
    config = AutoConfig.from_pretrained(shipped_dir(spec))
    ratio = config.num_attention_heads // config.num_key_value_heads
    values = {k: v for k, v in config.to_dict().items() if k not in ("layer_types", "architectures", "model_type")}
    values.update(num_hidden_layers=4, num_attention_heads=ratio, num_key_value_heads=1, head_dim=8,
                  hidden_size=8 * ratio, intermediate_size=16 * ratio, vocab_size=VOCAB, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, max_window_layers=4)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.model_type, **values),
                                             attn_implementation="sdpa")
    return model.to(dtype).eval()


@pytest.mark.parametrize("name", sorted(RECIPES))
@torch.no_grad()
def test_shrunk_members_of_each_recipe_stitch(name):
    hub_id, experts = RECIPES[name]
    hub = _shrunk(hub_id, 0)
    members = [_shrunk(e, 1 + i) for i, e in enumerate(experts.values())]
    model = BTSForCausalLM.from_members(hub, members, names=list(experts), num_stitches=4).eval()
    ids = random_ids(2, 12)
    # Starts as the hub exactly (blend init): the stitches change nothing until trained (logits come out fp32).
    assert torch.equal(model(ids).logits, hub(ids).logits.float())
    open_stitches(model, scale=0.1)
    logits = model(ids).logits
    assert torch.isfinite(logits).all() and (logits - hub(ids).logits).abs().max().item() > 1e-3
    assert_causal(model, random_ids(1, 12), (0, 5, 10))
    # Each member keeps its own rotary settings (Qwen2.5-Math: θ = 1e4 next to the hub's 1e6) and the stitched
    # context is the shortest member's.
    for member, spec in zip(model.members(), [hub_id, *experts.values()]):
        assert _rope(member.config) == _rope(AutoConfig.from_pretrained(shipped_dir(spec)))
    shortest = min(AutoConfig.from_pretrained(shipped_dir(s)).max_position_embeddings
                   for s in [hub_id, *experts.values()])
    assert model.config.max_position_embeddings == shortest


def test_qwen_math_expert_differs_from_the_hub_only_where_published():
    hub = AutoConfig.from_pretrained(shipped_dir("Qwen/Qwen2.5-1.5B")).to_dict()
    math = AutoConfig.from_pretrained(shipped_dir("Qwen/Qwen2.5-Math-1.5B")).to_dict()
    differ = {k for k in hub.keys() | math.keys() if hub.get(k) != math.get(k) and k != "_name_or_path"}
    assert differ <= {"rope_parameters", "max_position_embeddings", "sliding_window", "max_window_layers",
                      "layer_types"}
    assert "rope_parameters" in differ and "max_position_embeddings" in differ


# ---- running a recipe whose checkpoints are not cached -------------------------------------------------------
def _empty_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_running_a_recipe_whose_hub_is_not_cached_is_one_sentence_and_writes_nothing(name, tmp_path, monkeypatch,
                                                                                      capsys):
    work = _empty_cache(tmp_path, monkeypatch)
    assert main(["run", name]) == 2
    err = capsys.readouterr().err.strip()
    hub = RECIPES[name][0]
    assert err == f"bts: error: seed_model.path '{hub}' is neither a local model directory nor a hub id in the " \
                  "local cache."
    assert list(work.iterdir()) == []  # no runs/<name>, no lock, no data


def test_a_given_expert_that_is_not_cached_is_named_before_anything_is_written(tmp_path, monkeypatch, capsys):
    hub_dir, _ = save_members(tmp_path / "m", "qwen2", 1)  # a local hub: the expert is what is missing
    tiny_tokenizer().save_pretrained(hub_dir)  # the run tokenizes with the hub's tokenizer
    work = _empty_cache(tmp_path, monkeypatch)
    run_dir = work / "run"
    assert main(["run", "qwen2.5-1.5b-code-math", f"seed_model.path={hub_dir}", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bts: error: experts.paths.code 'Qwen/Qwen2.5-Coder-1.5B' is neither a local model directory " \
                  "nor a hub id in the local cache."
    assert not run_dir.exists() and list(work.iterdir()) == []


def test_a_recipes_plan_shows_only_the_phases_it_runs():
    """Given members are not trained and a recipe without BAM does not run it: their rows would read as if this run
    could not fit ('NO')."""
    from bts.pipeline.recipe import load_recipe
    from bts.pipeline.recipe_plan import recipe_plan

    names = [ph.name for ph in recipe_plan(load_recipe("qwen2.5-1.5b-code-math"))["phases"]]
    assert names == ["stitch training", "inference (BTS)"]
    demo = [ph.name for ph in recipe_plan(load_recipe("demo"))["phases"]]  # its seed is given (bundled:demo)
    assert demo[0].startswith("expert training") and "stitch training" in demo and "BAM training" in demo
    smoke = [ph.name for ph in recipe_plan(load_recipe("smoke"))["phases"]]
    assert smoke[0] == "seed pretraining"
    with_bam = [ph.name for ph in recipe_plan(load_recipe("demo", ["baselines.methods=[bam]"]))["phases"]]
    assert "BAM training" in with_bam and "BAM adapters training" not in with_bam
