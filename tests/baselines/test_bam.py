"""BAM and BAM adapters (bts.baselines.bam): equivalence with the dense model, soft routing, KV cache, what trains,
save/load through the Auto classes, and the parameter counts (closed form and the paper's Table 2)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import VOCAB, assert_generation_cache_free, random_ids, tiny_config, tiny_members, tiny_model
from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

from bts.baselines.bam import (BAMConfig, BAMForCausalLM, bam_counts, bam_counts_of, bam_parameter_counts,
                               bam_trainable_parameters, build_bam)
from bts.errors import BTSError


def other_family(kind: str, seed: int = 0):
    """Families tests/helpers.py does not build: Qwen3 (per-head q/k norms, head_dim != d/H) and a sliding-window
    Mistral (window 4, shorter than the test sequences)."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = Qwen3Config(head_dim=16, **common) if kind == "qwen3" else MistralConfig(sliding_window=4, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # norms away from 1, so q/k norms and block norms matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def identical(arch="llama", n=3):
    dense = other_family(arch) if arch in ("qwen3", "mistral_sliding") else tiny_model(arch, seed=0)
    return dense, [copy.deepcopy(dense) for _ in range(n - 1)]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- equivalence with the dense model ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3", "mistral_sliding"])
@pytest.mark.parametrize("options", [{}, {"kv_sharing": True}, {"adapters": True}])
def test_sequential_bam_of_identical_members_is_the_dense_model(arch, options):
    """Shapes tests/baselines/test_bam_families.py does not build: head_dim != d/H, a window shorter than the input."""
    dense, copies = identical(arch)
    ids = random_ids()
    bam = build_bam(dense, copies, parallel=False, **options)
    torch.testing.assert_close(logits(bam, ids), logits(dense, ids), atol=1e-5, rtol=1e-5)
    # Not vacuous: one member perturbed, and the mixture is no longer the dense model.
    with torch.no_grad():
        copies[0].model.layers[1].self_attn.q_proj.weight.add_(0.5)
        copies[0].model.layers[2].mlp.up_proj.weight.mul_(-1.0)
    other = build_bam(dense, copies, parallel=False, **options)
    assert (logits(other, ids) - logits(dense, ids)).abs().max() > 1e-3


def test_parallel_block_differs_from_the_sequential_one():
    hub, experts = tiny_members("llama", n=2)
    ids = random_ids()
    par, seq = build_bam(hub, experts), build_bam(hub, experts, parallel=False)
    assert par.config.parallel and not seq.config.parallel
    a, b = logits(par, ids), logits(seq, ids)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() > 1e-3
    # The parallel block has one norm per block (the averaged input_layernorm), the sequential one both.
    assert par.model.layers[0].ffn_norm is None and seq.model.layers[0].ffn_norm is not None
    # Identical members: the parallel block is a different computation from the dense (sequential) model.
    dense, copies = identical()
    assert (logits(build_bam(dense, copies), ids) - logits(dense, ids)).abs().max() > 1e-3


def test_experts_come_from_their_members_and_the_rest_is_averaged():
    hub, experts = tiny_members("llama", n=2)
    members = [hub, *experts]
    bam = build_bam(hub, experts, parallel=False)
    block = bam.model.layers[2]
    for m, member in enumerate(members):
        layer = member.model.layers[2]
        for mine, theirs in ((block.attn.experts[m], layer.self_attn), (block.mlp.experts[m], layer.mlp)):
            assert type(mine) is type(theirs)  # the family's own modules
            assert all(torch.equal(mine.state_dict()[k], v) for k, v in theirs.state_dict().items())
    mean = torch.stack([m.model.embed_tokens.weight for m in members]).mean(0)
    torch.testing.assert_close(bam.model.embed_tokens.weight, mean)
    ln2 = torch.stack([m.model.layers[2].post_attention_layernorm.weight for m in members]).mean(0)
    torch.testing.assert_close(block.ffn_norm.weight, ln2)
    assert not torch.equal(block.attn.experts[0].q_proj.weight, block.attn.experts[1].q_proj.weight)


def test_kv_sharing_keeps_one_averaged_kv_per_block_saved_and_counted_once(tmp_path):
    hub = other_family("qwen3")  # k_norm is shared too
    experts = [other_family("qwen3", 1), other_family("qwen3", 2)]
    members = [hub, *experts]
    bam = build_bam(hub, experts, kv_sharing=True)
    attn = bam.model.layers[2].attn
    for name in ("k_proj", "v_proj", "k_norm"):
        mean = torch.stack([getattr(m.model.layers[2].self_attn, name).weight for m in members]).mean(0)
        torch.testing.assert_close(getattr(attn.experts[0], name).weight, mean)
        for expert in attn.experts[1:]:  # borrowed: no parameters of their own
            assert not list(getattr(expert, name).parameters())
            assert getattr(expert, name).owner is getattr(attn.experts[0], name)
    for m, expert in enumerate(attn.experts):  # queries stay each member's own
        assert torch.equal(expert.q_proj.weight, members[m].model.layers[2].self_attn.q_proj.weight)
    bam.save_pretrained(tmp_path / "bam")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bam")
    assert loaded.model.layers[2].attn.experts[1].k_proj.owner is loaded.model.layers[2].attn.experts[0].k_proj
    ids = random_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(bam, ids), atol=0, rtol=0)


# ---- routing ------------------------------------------------------------------------------------------------------
def test_routers_are_random_and_seeded_by_seed_rng():
    hub, experts = tiny_members("llama", n=2)
    bam, again, other = build_bam(hub, experts), build_bam(hub, experts), build_bam(hub, experts, seed_rng=1)
    weight = bam.model.layers[0].attn_router.weight
    assert torch.equal(again.model.layers[0].attn_router.weight, weight)
    assert not torch.equal(other.model.layers[0].attn_router.weight, weight)
    torch.testing.assert_close(weight.std(), torch.tensor(hub.config.initializer_range), atol=0.01, rtol=0)


# ---- KV cache -----------------------------------------------------------------------------------------------------
# (cache equals no cache, with and without kv_sharing, and the cache's slot layout: tests/baselines/test_bam_families.py)


@pytest.mark.parametrize("arch,options", [("qwen3", {"kv_sharing": True}), ("mistral_sliding", {})])
def test_generate_with_cache_equals_without(arch, options):
    if arch in ("qwen3", "mistral_sliding"):
        hub, experts = other_family(arch, 0), [other_family(arch, 1), other_family(arch, 2)]
    else:
        hub, experts = tiny_members(arch, n=2)
    bam = build_bam(hub, experts, **options)
    assert_generation_cache_free(bam)


# ---- what trains --------------------------------------------------------------------------------------------------
def train_step(model, trainable, ids):
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def test_bam_trains_everything():
    hub, experts = tiny_members("llama", n=2)
    bam = build_bam(hub, experts)
    trainable = bam_trainable_parameters(bam)
    assert set(trainable) == {k for k, _ in bam.named_parameters()}
    before = snapshot(bam)
    train_step(bam, trainable, random_ids())
    after = snapshot(bam)
    for key in ("model.layers.1.attn.experts.1.q_proj.weight", "model.layers.1.mlp.experts.2.down_proj.weight",
                "model.embed_tokens.weight", "model.layers.1.attn_router.weight", "model.layers.1.attn_norm.weight"):
        assert not torch.equal(before[key], after[key])


# ---- saving and loading -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,options", [("llama", {"adapters": True, "kv_sharing": True}), ("qwen2", {})])
def test_save_load_round_trip_through_auto_classes(tmp_path, arch, options):
    hub, experts = tiny_members(arch, n=2)
    bam = build_bam(hub, experts, **options)
    ids = random_ids()
    with torch.no_grad():  # move off the init so the round trip is not checked on identity adapters only
        for p in bam.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = logits(bam, ids)
    bam.save_pretrained(tmp_path / "bam")
    files = {p.name for p in (tmp_path / "bam").iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    saved = json.loads((tmp_path / "bam" / "config.json").read_text())
    assert saved["model_type"] == "bts_bam" and saved["architectures"] == ["BAMForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bam")  # no trust_remote_code
    assert isinstance(loaded, BAMForCausalLM) and isinstance(loaded.config, BAMConfig)
    for key in ("adapters", "parallel", "kv_sharing", "num_members"):
        assert getattr(loaded.config, key) == getattr(bam.config, key)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=0, rtol=0)
    assert bam_parameter_counts(loaded) == bam_parameter_counts(bam)
    if arch == "qwen2":  # tied embeddings stay tied
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # Not vacuous: a different model does not give these logits.
    other = build_bam(hub, experts, seed_rng=5, **options)
    assert (logits(other, ids) - expected).abs().max() > 1e-4


def test_qwen2_tied_embeddings_are_one_tensor_and_counted_once():
    hub, experts = tiny_members("qwen2", n=2)
    bam = build_bam(hub, experts)
    assert bam.config.tie_word_embeddings
    assert bam.lm_head.weight.data_ptr() == bam.model.embed_tokens.weight.data_ptr()
    attn = bam.model.layers[0].attn.experts[1]
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None


def test_incompatible_members_are_refused():
    hub = tiny_model("llama", seed=0)
    with pytest.raises(BTSError, match="intermediate_size|shape"):
        build_bam(hub, [tiny_model("llama", seed=0, intermediate_size=48)])
    with pytest.raises(BTSError, match="router_init_std"):
        build_bam(hub, [copy.deepcopy(hub)], router_init_std=0.0)


# ---- parameter counts ---------------------------------------------------------------------------------------------
def dims(config, **extra):
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, **extra)


@pytest.mark.parametrize("options", [{}, {"adapters": True}, {"kv_sharing": True}, {"parallel": False},
                                     {"adapters": True, "parallel": False, "kv_sharing": True}])
def test_parameter_counts_match_the_closed_form(options):
    hub, experts = tiny_members("llama", n=2)
    bam = build_bam(hub, experts, **options)
    counts = bam_parameter_counts(bam)
    assert counts == bam_counts(**dims(hub.config), members=3, **options)
    # By hand for the tiny llama (V=97, d=32, F=64, L=4, H=4, H_kv=2, hd=8, M=3):
    V, d, Fw, L, M, hd = VOCAB, 32, 64, 4, 3, 8
    shared = 2 * V * d + d + L * d * (2 if options.get("parallel") is False else 1)
    attn = M * 2 * d * 4 * hd + (1 if options.get("kv_sharing") else M) * 2 * d * 2 * hd
    routers, adapters = L * 2 * M * d, L * M * 2 * d * d
    total = shared + L * (attn + M * 3 * d * Fw) + routers + (adapters if options.get("adapters") else 0)
    assert counts["total"] == total and counts["active"] == total
    assert counts["trainable"] == (adapters + routers if options.get("adapters") else total)


def test_parameter_counts_qwen2_tied_with_biases():
    hub, experts = tiny_members("qwen2", n=2)
    counts = bam_parameter_counts(build_bam(hub, experts))
    assert counts == bam_counts(**dims(hub.config), members=3, tie_word_embeddings=True, qkv_bias=True)
    assert counts != bam_counts(**dims(hub.config), members=3)  # untied / bias-free would count differently


@pytest.mark.parametrize("kv_sharing", [False, True])
def test_parameter_counts_qwen3_head_dim_and_qk_norms(kv_sharing):
    hub = other_family("qwen3")
    counts = bam_parameter_counts(build_bam(hub, [other_family("qwen3", 1)], kv_sharing=kv_sharing))
    c = hub.config
    assert counts == bam_counts(**dims(c), members=2, head_dim=16, tie_word_embeddings=c.tie_word_embeddings,
                                qk_norm=True, kv_sharing=kv_sharing)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_from_config_alone_inits_identity_adapters_and_counts_match(arch):
    base = other_family(arch).config if arch == "qwen3" else tiny_config(arch)
    model = AutoModelForCausalLM.from_config(BAMConfig(base_config=base.to_dict(), num_members=3, adapters=True))
    assert isinstance(model, BAMForCausalLM)
    eye = torch.eye(base.hidden_size).expand(3, -1, -1)
    for block in model.model.layers:
        assert torch.equal(block.attn.adapter, eye) and torch.equal(block.mlp.adapter, eye)
        assert 0 < block.attn_router.weight.std() < 0.1
        assert block.attn.experts[2].q_proj.weight.std() > 0
        assert torch.isfinite(block.mlp.experts[2].down_proj.weight).all()
    closed = bam_counts(**dims(base), members=3, head_dim=getattr(base, "head_dim", None),
                        tie_word_embeddings=bool(base.tie_word_embeddings), qkv_bias=arch == "qwen2",
                        qk_norm=arch == "qwen3", adapters=True)
    assert bam_parameter_counts(model) == bam_counts_of(base, 3, adapters=True) == closed
    torch.testing.assert_close(model(input_ids=random_ids()).logits.isfinite().all(), torch.tensor(True))


def test_table2_numbers():
    """The BTS paper's 2.7B seed (docs/method.md §4): L=20, d=3072, SwiGLU 8192, 24 heads, 1 KV head, vocab 128256,
    untied; seed + 3 experts = 4 members."""
    paper = dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=20, num_heads=24,
                 num_kv_heads=1, members=4)
    bam, adapters = bam_counts(**paper), bam_counts(**paper, adapters=True)
    two = lambda x: float(f"{x:.2g}")  # noqa: E731
    assert two(bam["total"]) == 8.4e9 and bam["trainable"] == bam["active"] == bam["total"]
    assert two(adapters["trainable"]) == 1.5e9
    assert two(adapters["total"]) == 9.9e9 and adapters["active"] == adapters["total"]
    seed = bam_counts(**{**paper, "members": 1})  # one member: the dense seed plus two 1-wide routers per block
    assert two(seed["total"] - 20 * 2 * 3072) == 2.7e9


# ---- the pipeline baselines (bts.baselines.registry) ----------------------------------------------------------
def test_pipeline_baselines_check_budget_and_load(tmp_path):
    """`bam` and `bam_adapters` as the pipeline sees them: their recipe options are checked, they train on the
    stitch's steps and batch at their own lr, and load() gives back the saved model in eval mode with the stage's
    accounting."""
    import dataclasses as dc

    from bts.baselines.base import write_model_dir
    from bts.baselines.registry import METHODS, REGISTRY
    from bts.pipeline.recipe import load_recipe

    assert METHODS.index("btx_soft") + 1 == METHODS.index("bam") == METHODS.index("bam_adapters") - 1
    recipe = load_recipe("smoke")
    assert {"bam", "bam_adapters"} <= set(recipe.baselines.methods)
    assert set(load_recipe("demo").baselines.methods) == set(recipe.baselines.methods)  # the demo runs every one
    for name, key in (("bam", "bam_lr"), ("bam_adapters", "bam_adapters_lr")):
        baseline = REGISTRY[name]
        assert baseline.trained and key in baseline.options
        budget = baseline.budget(dc.replace(recipe, baselines=dc.replace(recipe.baselines, **{key: 4e-3})))
        assert budget == dc.replace(recipe.stitch.train, lr=4e-3)
        with pytest.raises(BTSError, match=f"baselines.{key}"):
            baseline.check(dc.replace(recipe.baselines, **{key: 0.0}))
    with pytest.raises(BTSError, match="baselines.bam_lr"):
        load_recipe("smoke", ["baselines.bam_lr=-1"])
    hub, experts = tiny_members("llama", n=2)
    bam = build_bam(hub, experts, adapters=True)
    write_model_dir(bam, tmp_path / "bam_adapters")
    info = {"trainable_params": 1, "total_params": 2, "active_params": 2, "tokens": 5}
    loaded, accounting = REGISTRY["bam_adapters"].load(tmp_path / "bam_adapters", info)
    assert isinstance(loaded, BAMForCausalLM) and not loaded.training and loaded.config.adapters
    assert accounting == {"trainable_params": 1, "total_params": 2, "active_params": 2}
    ids = random_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(bam, ids), atol=0, rtol=0)
    with pytest.raises(BTSError, match="not a model directory"):
        REGISTRY["bam"].load(tmp_path / "nothing", info)
