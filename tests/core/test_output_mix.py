"""The output mix (bts.core.heads, `stitch.output`): starts as the hub, computes the documented equation from the
members' own norms and heads, stays causal, generates the same with and without a KV cache, trains only its own
parameters and round-trips through save / load."""

from __future__ import annotations

import pytest
import torch
from helpers import (assert_causal, assert_generation_cache_free, open_stitches, random_ids, save_members,
                     tiny_members)

from bts import BTSError, BTSForCausalLM
from bts.core.heads import OUTPUTS

MIXES = ("mix_hidden", "mix_logprobs")
F32 = torch.finfo(torch.float32).eps


def _stitched(output, n=2, arch="llama", dtype=torch.float64, **kw):
    hub, experts = tiny_members(arch, n)
    hub, experts = hub.to(dtype), [e.to(dtype) for e in experts]
    return hub, experts, BTSForCausalLM.from_members(hub, experts, output=output, **kw).eval()


@torch.no_grad()
def _open_output(model, seed=1, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    for p in model.output_mix.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


# ---- start as the hub ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("n", [1, 3])
@torch.no_grad()
def test_every_output_starts_as_the_hub(output, n):
    """float64 members; the model's logits are float32, so the bound is float32 rounding of the log-probs."""
    hub, _, model = _stitched(output, n)
    ids = random_ids()
    ref = torch.log_softmax(hub(ids).logits, -1)
    got = torch.log_softmax(model(ids).logits.double(), -1)
    assert (got - ref).abs().max() <= 4 * F32 * ref.abs().max()
    if output == "mix_hidden":  # the hub's head on 1·n_0, plus the experts' heads on exact zeros: bit for bit
        assert torch.equal(model(ids).logits, hub(ids).logits.float())


@pytest.mark.parametrize("output", MIXES)
def test_the_blend_gets_a_gradient_at_step_0(output):
    """At init every expert weight is exactly 0, yet the loss moves the blend at once (no dead start)."""
    _, _, model = _stitched(output, 2)
    ids = random_ids()
    model(ids, labels=ids).loss.backward()
    assert model.output_mix.blend.grad.abs().max() > 0
    assert torch.isfinite(model.output_mix.gate.weight.grad).all()


# ---- the equations, against the members' own forwards ---------------------------------------------------------------
@torch.no_grad()
def _member_parts(hub, experts, ids):
    """Each member run on its own: final-normed hidden states and scaled logits."""
    outs = [m(ids, output_hidden_states=True) for m in [hub, *experts]]
    return [o.hidden_states[-1] for o in outs], [o.logits for o in outs]


@torch.no_grad()
def test_mix_logprobs_is_a_token_gated_ensemble_of_the_members_own_forwards():
    """With the stitches at init (the members run as themselves), the output is log Σ_m w_m p_m with the
    reported per-token weights and each member's own full-forward distribution."""
    hub, experts, model = _stitched("mix_logprobs", 3)
    _open_output(model)
    ids = random_ids()
    out = model(ids, return_gates=True)
    w = out["output_gates"][..., 0]  # [B, T, n+1]
    assert w.shape == (*ids.shape, 4) and (w.min(-1).values > 0).all()  # opened: every member takes part
    _, logits = _member_parts(hub, experts, ids)
    probs = torch.stack([torch.softmax(lg, -1) for lg in logits], -2)  # [B, T, n+1, V]
    want = torch.log((w[..., None] * probs).sum(-2))
    assert (out.logits.double() - want).abs().max() <= 4 * F32 * want.abs().max()


@torch.no_grad()
def test_mix_hidden_sums_each_members_own_head_on_its_gated_channels():
    hub, experts, model = _stitched("mix_hidden", 2)
    _open_output(model)
    ids = random_ids()
    out = model(ids, return_gates=True)
    w = out["output_gates"]  # [B, T, n+1, d]
    normed, _ = _member_parts(hub, experts, ids)
    want = sum(m.lm_head(w[..., i, :] * x) for i, (m, x) in enumerate(zip([hub, *experts], normed)))
    assert (out.logits.double() - want).abs().max() <= 4 * F32 * want.abs().max()
    # The experts' heads are really read: changing one changes the output.
    with torch.no_grad():
        model.expert_heads[1].weight.mul_(1.5)
    assert (model(ids).logits - out.logits).abs().max() > 1e-3


@pytest.mark.parametrize("output", MIXES)
@torch.no_grad()
def test_output_gates_sum_to_one_also_over_a_sparse_subset(output):
    _, _, model = _stitched(output, 3)
    _open_output(open_stitches(model))
    model.output_mix.blend.data[0] = -0.5  # a negative blend: mix_logprobs must still give weights ≥ 0
    ids = random_ids()
    for active in (None, ["expert2"], ["expert1", "expert3"]):
        model.set_active_experts(active)
        w = model(ids, return_gates=True)["output_gates"]
        assert w.shape[-2] == 1 + (3 if active is None else len(active))
        assert (w.sum(-2) - 1).abs().max() <= 1e-12
        if output == "mix_logprobs":  # a mixture of distributions: never a negative weight
            assert (w >= 0).all()


# ---- causality and the KV cache -----------------------------------------------------------------------------------
@pytest.mark.parametrize("output", MIXES)
@pytest.mark.parametrize("execution", ["loop", "batched"])
def test_causal_and_cache_free_generation(output, execution):
    """Experts now run to the last block and fill its cache slots too; a cached decode equals an uncached one."""
    _, _, model = _stitched(output, 2, dtype=torch.float32)
    _open_output(open_stitches(model))
    model.set_execution(execution)
    assert_causal(model, random_ids(1, 12), [3, 8])
    assert_generation_cache_free(model)


@torch.no_grad()
def test_batched_and_loop_agree_and_experts_run_every_block():
    _, _, model = _stitched("mix_hidden", 2, dtype=torch.float32)
    _open_output(open_stitches(model))
    ids = random_ids()
    model.set_execution("loop")
    loop = model(ids).logits
    model.set_execution("batched")
    assert (model(ids).logits - loop).abs().max() <= 1e-4
    runner = model._runner(None, False)
    assert runner.live == model.config.base_config.num_hidden_layers


# ---- training --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", MIXES)
def test_training_moves_only_the_stitches_and_the_output_mix(output):
    _, _, model = _stitched(output, 2, dtype=torch.float32)
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if not k.startswith(("stitches.", "output_mix."))}
    trained = model.named_stitch_parameters()
    assert any(k.startswith("output_mix.") for k in trained)
    before = {k: p.detach().clone() for k, p in trained.items()}
    opt = torch.optim.AdamW(list(trained.values()), lr=1e-2)
    ids = random_ids()
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in trained)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # members (and expert heads) bit-identical
    assert not torch.equal(before["output_mix.blend"], trained["output_mix.blend"].detach())


# ---- save / load ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", MIXES)
def test_save_load_round_trip_keeps_the_option_and_the_expert_heads(tmp_path, output):
    hub, experts = save_members(tmp_path, n=2)
    model = BTSForCausalLM.from_members(hub, experts, output=output).eval()
    assert all(h.weight.device.type == "cpu" for h in model.expert_heads)  # not dropped to the meta device
    _open_output(open_stitches(model))
    ids = random_ids()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "out")
    loaded = BTSForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.stitch_output == output and loaded.output_mix.mode == output
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)


def test_a_hub_output_model_drops_expert_heads_and_refuses_output_weights(tmp_path):
    hub, experts = save_members(tmp_path, n=1)
    model = BTSForCausalLM.from_members(hub, experts)
    assert model.output_mix is None and model.expert_heads is None
    assert model._expert_models[0].lm_head.weight.device.type == "meta"
    model.save_pretrained(tmp_path / "plain")
    mixed = BTSForCausalLM.from_members(hub, experts, output="mix_hidden")
    mixed.save_pretrained(tmp_path / "mixed")
    # A hub-output config over weights that carry an output mix: refused, not silently ignored.
    (tmp_path / "mixed" / "stitch.safetensors").replace(tmp_path / "plain" / "stitch.safetensors")
    with pytest.raises(BTSError, match="does not match the config"):
        BTSForCausalLM.from_pretrained(tmp_path / "plain")


def test_bad_output_is_one_sentence_and_surgery_refuses_a_mix():
    hub, experts = tiny_members("llama", 1)
    with pytest.raises(BTSError) as err:
        BTSForCausalLM.from_members(hub, experts, output="heads")
    msg = str(err.value)
    assert "output must be one of hub, mix_hidden, mix_logprobs" in msg and "'heads'" in msg and "\n" not in msg
    from bts.core.surgery import remove_expert

    model = BTSForCausalLM.from_members(hub, tiny_members("llama", 2)[1], output="mix_logprobs")
    with pytest.raises(BTSError, match="not supported with stitch_output 'mix_logprobs'"):
        remove_expert(model, "expert1")


@pytest.mark.parametrize("output", MIXES)
def test_checkpointed_members_give_the_same_gradients(output):
    """Checkpointed runners hand the output mix the same streams (Checkpointed.streams): equal gradients."""
    _, _, model = _stitched(output, 2)
    _open_output(open_stitches(model))
    ids = random_ids()
    grads = []
    for checkpoint in (False, True):
        model.set_execution(checkpoint_members=checkpoint)
        model.zero_grad()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_stitch_parameters().items()})
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=0, atol=1e-12) for k in grads[0])
