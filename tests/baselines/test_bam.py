"""BAM and BAM adapters (bts.baselines.bam): equivalence with the dense model, soft routing, KV cache, what trains,
save/load through the Auto classes, and the parameter counts (closed form and the paper's Table 2)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import VOCAB, random_ids, tiny_config, tiny_members, tiny_model
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
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral_sliding"])
@pytest.mark.parametrize("options", [{}, {"kv_sharing": True}, {"adapters": True}])
def test_sequential_bam_of_identical_members_is_the_dense_model(arch, options):
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
    assert not hasattr(par.model.layers[0], "post_attention_layernorm")
    assert hasattr(seq.model.layers[0], "post_attention_layernorm")
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
        for role in ("q", "k", "v", "o"):
            assert torch.equal(getattr(block.attn, f"{role}_proj")[m], getattr(layer.self_attn, f"{role}_proj").weight)
        for role in ("gate", "up", "down"):
            assert torch.equal(getattr(block.mlp, f"{role}_proj")[m], getattr(layer.mlp, f"{role}_proj").weight)
    mean = torch.stack([m.model.embed_tokens.weight for m in members]).mean(0)
    torch.testing.assert_close(bam.model.embed_tokens.weight, mean)
    ln2 = torch.stack([m.model.layers[2].post_attention_layernorm.weight for m in members]).mean(0)
    torch.testing.assert_close(block.post_attention_layernorm.weight, ln2)
    assert not torch.equal(block.attn.q_proj[0], block.attn.q_proj[1])
    shared = build_bam(hub, experts, kv_sharing=True).model.layers[2].attn
    assert shared.k_proj.shape[0] == 1 and shared.q_proj.shape[0] == 3
    k_mean = torch.stack([m.model.layers[2].self_attn.k_proj.weight for m in members]).mean(0)
    torch.testing.assert_close(shared.k_proj[0], k_mean)


# ---- routing ------------------------------------------------------------------------------------------------------
def test_soft_routing_weights_every_expert_and_sums_to_one():
    hub, experts = tiny_members("llama", n=2)
    bam = build_bam(hub, experts)
    with torch.no_grad():
        routing = bam(input_ids=random_ids(), return_routing=True)["routing"]
    assert len(routing) == 2 * bam.config.base_config.num_hidden_layers
    for weights in routing:
        assert weights.shape == (2, 12, 3)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 12), atol=1e-6, rtol=0)
        assert (weights > 0).all()
        assert weights.std(-1).max() > 1e-4  # random routers: not the uniform 1/M everywhere
    # Routers are random, seeded by seed_rng.
    again, other = build_bam(hub, experts), build_bam(hub, experts, seed_rng=1)
    assert torch.equal(again.model.layers[0].attn_router.weight, bam.model.layers[0].attn_router.weight)
    assert not torch.equal(other.model.layers[0].attn_router.weight, bam.model.layers[0].attn_router.weight)


# ---- KV cache -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"kv_sharing": True}, {"parallel": False, "adapters": True}])
def test_cache_equals_no_cache(options):
    hub, experts = tiny_members("llama", n=2)
    bam = build_bam(hub, experts, **options)
    ids = random_ids(2, 10)
    full = logits(bam, ids)
    with torch.no_grad():
        out = bam(input_ids=ids[:, :6], use_cache=True)
        cache = out.cache
        steps = [out.logits]
        for t in range(6, 10):
            out = bam(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # One slot per block, holding every attention expert's keys (or the one shared set).
    base = bam.config.base_config
    assert len(cache.layers) == base.num_hidden_layers
    heads = base.num_key_value_heads * (1 if options.get("kv_sharing") else 3)
    assert cache.layers[0].keys.shape == (2, heads, 10, base.hidden_size // base.num_attention_heads)
    # Not vacuous: a cache from other tokens gives other logits.
    with torch.no_grad():
        wrong = bam(input_ids=ids[:, :6].flip(1), use_cache=True).cache
        bad = bam(input_ids=ids[:, 6:7], cache=wrong, use_cache=True).logits
    assert (bad[:, 0] - full[:, 6]).abs().max() > 1e-3


@pytest.mark.parametrize("arch,options", [("llama", {}), ("llama", {"kv_sharing": True}), ("qwen2", {}),
                                          ("qwen3", {"kv_sharing": True}), ("mistral_sliding", {})])
def test_generate_with_cache_equals_without(arch, options):
    if arch in ("qwen3", "mistral_sliding"):
        hub, experts = other_family(arch, 0), [other_family(arch, 1), other_family(arch, 2)]
    else:
        hub, experts = tiny_members(arch, n=2)
    bam = build_bam(hub, experts, **options)
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    ids[1, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = bam.generate(ids, use_cache=True, **kwargs)
        uncached = bam.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, uncached)


# ---- what trains --------------------------------------------------------------------------------------------------
def train_step(model, trainable, ids):
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def test_adapters_train_only_routers_and_adapters_and_members_stay_bit_identical():
    hub, experts = tiny_members("llama", n=2)
    members = [hub, *experts]
    before_members = [snapshot(m) for m in members]
    bam = build_bam(hub, experts, adapters=True)
    trainable = bam_trainable_parameters(bam)
    assert trainable and all(k.endswith(("_router.weight", ".adapter")) for k in trainable)
    L = bam.config.base_config.num_hidden_layers
    assert len(trainable) == 4 * L  # 2 routers + 2 adapter stacks per block
    before = snapshot(bam)
    train_step(bam, trainable, random_ids())
    after = snapshot(bam)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(trainable)
    for i in range(L):
        for m, member in enumerate(members):
            layer, block = member.model.layers[i], bam.model.layers[i]
            for role in ("q", "k", "v", "o"):
                assert torch.equal(getattr(block.attn, f"{role}_proj")[m], getattr(layer.self_attn, f"{role}_proj").weight)
            for role in ("gate", "up", "down"):
                assert torch.equal(getattr(block.mlp, f"{role}_proj")[m], getattr(layer.mlp, f"{role}_proj").weight)
    for member, snap in zip(members, before_members):  # building and training never touch the source members
        assert all(torch.equal(snap[k], v) for k, v in member.state_dict().items())


def test_bam_trains_everything():
    hub, experts = tiny_members("llama", n=2)
    bam = build_bam(hub, experts)
    trainable = bam_trainable_parameters(bam)
    assert set(trainable) == {k for k, _ in bam.named_parameters()}
    before = snapshot(bam)
    train_step(bam, trainable, random_ids())
    after = snapshot(bam)
    for key in ("model.layers.1.attn.q_proj", "model.layers.1.mlp.down_proj", "model.embed_tokens.weight",
                "model.layers.1.attn_router.weight"):
        assert not torch.equal(before[key], after[key])


# ---- saving and loading -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,options", [("llama", {}), ("llama", {"adapters": True, "kv_sharing": True}),
                                          ("llama", {"parallel": False}), ("qwen2", {})])
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
    assert bam.model.layers[0].attn.q_bias is not None and bam.model.layers[0].attn.o_bias is None


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
        assert block.attn.q_proj.std() > 0 and torch.isfinite(block.mlp.down_proj).all()
    assert bam_parameter_counts(model) == bam_counts_of(base, 3, adapters=True)
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
    # the demo leaves them out until its budgets are redrawn (they would take it past 15 min); the rest it shares
    assert set(load_recipe("demo").baselines.methods) == set(recipe.baselines.methods) - {"bam", "bam_adapters"}
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
