"""BAM and BAM adapters on every supported family (tests/helpers.py FAMILIES): the sequential block of identical
members is the dense model (float64), the parallel block is the documented one (docs/bam.md), soft routing sums to
1, the KV cache changes nothing, only routers and adapters train in BAM adapters, and save -> load through the Auto
classes gives the same model."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FAMILIES, assert_generation_cache_free, random_ids, tiny_members, tiny_model
from transformers import AutoModelForCausalLM

from bts.baselines.bam import BAMForCausalLM, bam_counts_of, bam_parameter_counts, bam_trainable_parameters, build_bam
from bts.core import hf
from bts.errors import BTSError

# Transformers' norms compute in float32 inside a float64 model (they cast), so a 1-ulp float64 difference in a norm's
# input (sum_m g_m y vs y) can flip one float32 rounding (eps32 ~ 1.2e-7 relative). Measured: at most 1.7e-16 on
# these members, 4.1e-10 on unperturbed olmo2 ones. A broken mixture is off by > 1e-3 of the logits' size (far_apart).
ATOL64 = 1e-7


def options_for(arch):
    opts = [{}, {"adapters": True}]
    return opts + ([] if arch == "phi3" else [{"kv_sharing": True}])  # phi3's fused qkv_proj: kv_sharing refused


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.double()


def far_apart(a, b):
    """Apart by far more than ATOL64, relative to the logits' size (Granite's are ~0.05: logits_scaling 4)."""
    return (a - b).abs().max() > 1e-3 * b.abs().max()


def perturbed(models, seed=0, noise=0.5):
    """Copies of `models` with every weight moved, so norms, biases and q/k norms all matter."""
    gen = torch.Generator().manual_seed(seed)
    out = [copy.deepcopy(m) for m in models]
    with torch.no_grad():
        for model in out:
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=gen, dtype=p.dtype) * p.std().clamp_min(1e-2))
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_sequential_bam_of_identical_members_is_the_dense_model(arch):
    dense = perturbed([tiny_model(arch, seed=0).to(torch.float64)])[0]
    ids = random_ids()
    for options in options_for(arch):
        bam = build_bam(dense, [copy.deepcopy(dense), copy.deepcopy(dense)], parallel=False, **options)
        assert next(bam.parameters()).dtype == torch.float64
        torch.testing.assert_close(logits(bam, ids), logits(dense, ids), atol=ATOL64, rtol=0)
    # Not vacuous: one member's block 1 changed, and the mixture is no longer the dense model.
    other = copy.deepcopy(dense)
    with torch.no_grad():
        for p in hf.decoder_of(other).layers[1].parameters():
            p.mul_(-1.0)
    bam = build_bam(dense, [other, copy.deepcopy(dense)], parallel=False)
    assert far_apart(logits(bam, ids), logits(dense, ids))


def dense_parallel_logits(dense, ids):
    """The dense model's layers in docs/bam.md's parallel block: n = attention pre-norm(x) (x where the family has
    none), y = x + r * (post_a(Attn(n)) + post_f(FFN(n))); the FFN pre-norm is dropped, output norms kept, r is
    Granite's residual multiplier (1 elsewhere). A BAM of identical members must compute exactly this."""
    config, dec = dense.config, hf.decoder_of(dense)
    norms, scale = hf.block_norms(config), hf.residual_multiplier(config)
    x = hf.embed(dec, ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    masks = hf.build_masks(config, x, None, None, positions)
    ropes = hf.rotaries(dec, x, positions)
    for layer, kind in zip(dec.layers, hf.layer_types(config)):
        n = getattr(layer, norms["attn_in"])(x) if "attn_in" in norms else x
        a = hf.call_attention(layer.self_attn, n, mask=masks[kind], position_embeddings=ropes[kind],
                              position_ids=positions, cache=None)
        f = layer.mlp(n)
        a = getattr(layer, norms["attn_out"])(a) if "attn_out" in norms else a
        f = getattr(layer, norms["ffn_out"])(f) if "ffn_out" in norms else f
        x = x + scale * (a + f)
    return hf.lm_logits(dense, dec.norm(x)).double()


@pytest.mark.parametrize("arch", FAMILIES)
def test_parallel_block_is_the_documented_one(arch):
    dense = perturbed([tiny_model(arch, seed=0).to(torch.float64)])[0]
    ids = random_ids()
    bam = build_bam(dense, [copy.deepcopy(dense)])
    assert bam.config.parallel
    norms = hf.block_norms(dense.config)
    block = bam.model.layers[0]
    assert block.ffn_norm is None and (block.attn_norm is None) == ("attn_in" not in norms)
    assert (block.attn.post_norms is None) == ("attn_out" not in norms)
    assert (block.mlp.post_norms is None) == ("ffn_out" not in norms)
    with torch.no_grad():
        expected = dense_parallel_logits(dense, ids)
    torch.testing.assert_close(logits(bam, ids), expected, atol=ATOL64, rtol=0)
    # Not vacuous: the parallel block is not the dense (sequential) model.
    assert far_apart(logits(bam, ids), logits(dense, ids))


@pytest.mark.parametrize("arch", FAMILIES)
def test_soft_routing_weights_every_expert_and_sums_to_one(arch):
    hub, experts = tiny_members(arch, n=2)
    bam = build_bam(hub, experts)
    with torch.no_grad():
        routing = bam(input_ids=random_ids(), return_routing=True)["routing"]
    assert len(routing) == 2 * hub.config.num_hidden_layers
    for weights in routing:
        assert weights.shape == (2, 12, 3) and (weights > 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 12), atol=1e-6, rtol=0)
        assert weights.std(-1).max() > 1e-4  # random routers: not the uniform 1/M everywhere


@pytest.mark.parametrize("arch", FAMILIES)
def test_cache_equals_no_cache_with_one_cache_per_attention_expert(arch):
    hub, experts = tiny_members(arch, n=2)
    ids = random_ids(2, 14)  # longer than gemma2/3's sliding window of 8
    # phi3 fuses q, k and v into one projection: it has no K/V of its own to share (refused in one sentence)
    for options in ({}, {"parallel": False, "adapters": True}, *([{"kv_sharing": True}] if arch != "phi3" else [])):
        bam = build_bam(hub, experts, **options)
        full = logits(bam, ids)
        with torch.no_grad():
            out = bam(input_ids=ids[:, :6], use_cache=True)
            cache, steps = out.cache, [out.logits]
            for t in range(6, 14):
                out = bam(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
                steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1).double(), full, atol=1e-5, rtol=1e-5)
    # One slot per (member, block), each of its member's kind: expert m of block i in slot m * L + i.
    L, types = hub.config.num_hidden_layers, hf.layer_types(hub.config)
    assert len(cache.layers) == 3 * L
    for m in range(3):
        for i, kind in enumerate(types):
            layer = cache.layers[m * L + i]
            assert hasattr(layer, "sliding_window") == (kind == "sliding_attention")
    # Not vacuous: a cache from other tokens gives other logits.
    with torch.no_grad():
        wrong = bam(input_ids=ids[:, :6].flip(1), use_cache=True).cache
        bad = bam(input_ids=ids[:, 6:7], cache=wrong, use_cache=True).logits
    assert (bad[:, 0].double() - full[:, 6]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", FAMILIES)
def test_generate_with_cache_equals_without(arch):
    hub, experts = tiny_members(arch, n=2)
    bam = build_bam(hub, experts, kv_sharing=arch != "phi3")
    assert_generation_cache_free(bam)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", FAMILIES)
def test_adapters_train_only_routers_and_adapters_and_members_stay_bit_identical(arch):
    hub, experts = tiny_members(arch, n=2)
    members = [hub, *experts]
    before_members = [snapshot(m) for m in members]
    bam = build_bam(hub, experts, adapters=True)
    trainable = bam_trainable_parameters(bam)
    L = hub.config.num_hidden_layers
    assert len(trainable) == 4 * L and all(k.endswith(("_router.weight", ".adapter")) for k in trainable)
    before = snapshot(bam)
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    bam.train()
    bam(input_ids=random_ids(), labels=random_ids()).loss.backward()
    opt.step()
    after = snapshot(bam)
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(trainable)
    for i in range(L):  # every expert is still its member's own attention and MLP, bit for bit
        block = bam.model.layers[i]
        for m, member in enumerate(members):
            layer = hf.decoder_of(member).layers[i]
            for mine, theirs in ((block.attn.experts[m], layer.self_attn), (block.mlp.experts[m], layer.mlp)):
                assert all(torch.equal(mine.state_dict()[k], v) for k, v in theirs.state_dict().items())
    for member, snap in zip(members, before_members):  # building and training never touch the source members
        assert all(torch.equal(snap[k], v) for k, v in member.state_dict().items())


@pytest.mark.parametrize("arch", FAMILIES)
def test_save_load_round_trip_through_auto_classes(tmp_path, arch):
    hub, experts = tiny_members(arch, n=2)
    impl = hub.config._attn_implementation
    for j, options in enumerate(({}, {"adapters": True, "parallel": False})):
        bam = build_bam(hub, experts, **options)
        ids = random_ids()
        with torch.no_grad():  # off the init, so adapters and routers are not checked at identity / one draw only
            for p in bam.parameters():
                p.add_(0.01 * torch.randn_like(p))
        expected = logits(bam, ids)
        bam.save_pretrained(tmp_path / f"bam{j}")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"bam{j}", attn_implementation=impl)
        assert isinstance(loaded, BAMForCausalLM) and loaded.config.base_config.model_type == hub.config.model_type
        torch.testing.assert_close(logits(loaded, ids), expected, atol=0, rtol=0)
        assert bam_parameter_counts(loaded) == bam_parameter_counts(bam)
        if hub.config.tie_word_embeddings:
            assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", FAMILIES)
def test_counts_from_the_config_equal_the_built_model(arch):
    hub, experts = tiny_members(arch, n=2)
    for options in options_for(arch) + [{"parallel": False}]:
        model = build_bam(hub, experts, **options)
        assert bam_counts_of(hub.config, 3, **options) == bam_parameter_counts(model)
    if arch == "phi3":
        with pytest.raises(BTSError, match="kv_sharing"):
            build_bam(hub, experts, kv_sharing=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_members_keep_their_own_rotary_settings(tmp_path, arch):
    """An expert with another rope θ (e.g. continued pretraining at a longer context) runs its attention with its
    own rotary embedding, as it did in its own model; the setting survives save -> load."""
    hub = tiny_model(arch, seed=0)
    rope = copy.deepcopy(hub.config.rope_parameters)
    for params in (rope.values() if arch == "gemma3_text" else [rope]):
        params["rope_theta"] = 1234.0
    other = tiny_model(arch, seed=0, rope_parameters=rope)
    bam = build_bam(hub, [other])
    assert bam.config.member_rope[0] is None and bam.config.member_rope[1]["rope_parameters"] == rope
    x = torch.randn(1, 5, hub.config.hidden_size)
    positions = torch.arange(5).unsqueeze(0)
    ropes = bam.model.position_embeddings(x, positions)
    for m, member in enumerate((hub, other)):
        own = hf.rotaries(hf.decoder_of(member), x, positions)
        for kind, (cos, sin) in own.items():
            assert torch.equal(ropes[m][kind][0], cos) and torch.equal(ropes[m][kind][1], sin)
    assert not torch.equal(ropes[0][hf.layer_types(hub.config)[0]][0], ropes[1][hf.layer_types(hub.config)[0]][0])
    bam.save_pretrained(tmp_path / "bam")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bam")
    ids = random_ids()
    torch.testing.assert_close(logits(loaded, ids), logits(bam, ids), atol=0, rtol=0)
    same = build_bam(hub, [copy.deepcopy(hub)])  # not vacuous: the same weights with the seed's rope differ
    assert (logits(same, ids) - logits(bam, ids)).abs().max() > 1e-4
