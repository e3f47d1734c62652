"""Invariants of the stitched model (docs/method.md §2-§7): starts as the hub, trains only the stitches, stays causal,
generates like a hand-written greedy loop, and round-trips through save/load with its members checked."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import VOCAB, assert_causal, open_stitches, random_ids, save_members, tiny_members
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import bts  # noqa: F401  (registers model_type "bts" with the Auto classes)
from bts import BTSError, BTSForCausalLM, StitchLayer
from bts.core.stitch import E2H, H2E, stitch_kinds, stitch_positions


def _stitched(arch="llama", n=2, **kw):
    hub, experts = tiny_members(arch, n)
    return hub, BTSForCausalLM.from_members(hub, experts, **kw).eval()


def _train_steps(model, ids, steps, lr=1e-2):
    """AdamW over exactly the trainable parameters; returns the optimizer and each step's stitch gradients."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    grads = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.stitches.named_parameters()})
        opt.step()
    model.eval()
    return opt, grads


# ---- start as the hub ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@torch.no_grad()
def test_blend_init_is_the_hub(arch, n):
    hub, model = _stitched(arch, n)
    ids = random_ids()
    assert (model(ids).logits - hub(ids).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_bias_init_matches_hub_only_within_tolerance_and_mixturekit_does_not():
    hub, experts = tiny_members("llama", 3)
    ids = random_ids()
    ref = hub(ids).logits
    for beta, tol in [(8.0, 1e-4), (30.0, 1e-6)]:  # measured: 8e-8 at beta 8, 0.0 at beta 30
        model = BTSForCausalLM.from_members(hub, experts, init="bias", beta=beta).eval()
        assert (model(ids).logits - ref).abs().max() <= tol
    # MixtureKit's (I, 0) init starts E→H as a uniform average over members: not the hub (measured ~1e-2 off).
    model = BTSForCausalLM.from_members(hub, experts, init="mixturekit").eval()
    assert (model(ids).logits - ref).abs().max() > 1e-3


# ---- gradients -------------------------------------------------------------------------------------------------------
def test_blend_init_has_live_gradients():
    hub, model = _stitched("llama", 2)  # 4 layers, stitches H→E, E→H, H→E, E→H
    ids = random_ids()
    with torch.no_grad():
        before = model(ids).logits
    _, grads = _train_steps(model, ids, 3)
    kinds = model.config.stitch_kinds
    # The zero blend gates open the chain one link per step (measured, lr 1e-2):
    # step 1: only the E→H blends (|grad| ~5e-4); everything upstream of a closed blend sees 0.
    # step 2: E→H projections/gates (~1e-4 / 1e-7) and the H→E blends (~2e-6).
    # step 3: every stitch parameter, including the first H→E's projection (~1e-6).
    for name, g in grads[0].items():
        layer, param = int(name.split(".")[0]), name.split(".", 1)[1]
        assert (g.abs().max() > 0) == (param == "blend" and kinds[layer] == E2H), name
    for name, g in grads[1].items():
        if kinds[int(name.split(".")[0])] == E2H or name.endswith("blend"):
            assert g.abs().max() > 0, name
    assert all(g.abs().max() > 0 for g in grads[2].values())
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() > 1e-4  # measured ~6e-3


def test_saturated_bias_init_barely_trains():
    hub, model = _stitched("llama", 2, init="bias", beta=8.0)
    ids = random_ids()
    with torch.no_grad():
        before = model(ids).logits
    _, grads = _train_steps(model, ids, 3)
    # Measured: stitch gradients 3e-15 .. 5e-9 (below Adam's eps 1e-8), output moved ~6e-8 after 3 steps.
    assert max(g.abs().max() for step in grads for g in step.values()) < 1e-7
    with torch.no_grad():
        assert (model(ids).logits - before).abs().max() < 1e-5


# ---- causality ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", ["projected", "raw"])
@torch.no_grad()
def test_causal_with_open_stitches(stream):
    _, model = _stitched("mistral", 3, expert_stream=stream)
    open_stitches(model)
    assert_causal(model, random_ids(1, 10), (0, 4, 8))


# ---- frozen members ---------------------------------------------------------------------------------------------
def test_training_changes_only_stitches():
    _, model = _stitched("qwen2", 2)
    member_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("stitches.")}
    stitch_before = {k: v.clone() for k, v in model.stitches.state_dict().items()}
    assert not any(p.requires_grad for m in model.members() for p in m.parameters())
    opt, _ = _train_steps(model, random_ids(), 4)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.stitch_parameters()}
    after = model.state_dict()
    for k, v in member_before.items():
        assert torch.equal(after[k], v), k  # bit-identical
    assert all(not torch.equal(model.stitches.state_dict()[k], v) for k, v in stitch_before.items())
    model.train()
    assert model.stitches.training
    assert not any(mod.training for m in model.members() for mod in m.modules())


def test_no_autograd_before_first_stitch_and_dead_expert_blocks_skipped():
    _, model = _stitched("llama", 2, positions=[2, 3])  # H→E after block 2, E→H after block 3 (of 4)
    model.train()
    seen = {}

    def record(name):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[name] = (out.requires_grad, out.grad_fn)
        return hook

    for m, member in enumerate([model.hub.model, *model.experts]):
        for i, layer in enumerate(member.layers):
            layer.register_forward_hook(record((m, i)))
    first = model.stitches[0]
    first.register_forward_pre_hook(lambda _mod, args: seen.__setitem__("stitch0", [a.requires_grad for a in args]))
    model(random_ids(), labels=random_ids()).loss.backward()
    for m in range(3):
        for i in range(2):  # blocks before the first stitch: plain frozen inference, no graph
            assert seen[(m, i)] == (False, None), (m, i)
    assert seen["stitch0"] == [False, False]
    assert seen[(0, 2)] == (False, None)  # H→E does not touch the hub
    assert seen[(1, 2)][0] and seen[(0, 3)][0]  # experts after H→E and the hub after E→H carry a graph
    assert (1, 3) not in seen and (2, 3) not in seen  # expert blocks after the last E→H never run


# ---- generation ---------------------------------------------------------------------------------------------------
def _greedy_by_hand(model, ids, mask, steps):
    for _ in range(steps):
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def test_generate_matches_hand_written_greedy_with_left_padding():
    _, model = _stitched("llama", 2)
    open_stitches(model, scale=0.1)
    ids = random_ids(3, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left-padded prompts of different lengths
    mask[2, :5] = 0
    ids = ids.masked_fill(mask == 0, model.config.pad_token_id)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    cached = model.generate(ids, **kw)
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, _greedy_by_hand(model, ids, mask, 6))
    beams = model.generate(ids, num_beams=3, **kw)
    assert beams.shape == cached.shape


def test_generate_at_init_equals_hub_and_stops_at_eos():
    hub, model = _stitched("qwen2", 3)
    assert model.config.eos_token_id == 2 and model.config.pad_token_id == 0
    assert model.generation_config.eos_token_id == 2
    ids = random_ids(1, 6)
    free = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(free, hub.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None))
    stop = int(free[0, 6 + 3])  # make the 4th generated token the eos
    first = (free[0, 6:] == stop).nonzero()[0].item()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=stop)
    assert out.shape[1] == 6 + first + 1 and out[0, -1] == stop


# ---- dtypes ---------------------------------------------------------------------------------------------------------
def test_bf16_members_fp32_stitches(tmp_path):
    hub_dir, expert_dirs = save_members(tmp_path, "llama", 2)
    model = BTSForCausalLM.from_members(hub_dir, expert_dirs, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for m in model.members() for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in model.stitch_parameters())
    model.to(torch.bfloat16)  # a blanket cast must not touch the stitches
    assert all(p.dtype == torch.float32 for p in model.stitch_parameters())
    _, grads = _train_steps(model, random_ids(), 2)
    assert torch.isfinite(model(random_ids()).logits).all()
    assert all(g.dtype == torch.float32 for g in grads[-1].values())
    assert all(p.dtype == torch.float32 for p in model.stitch_parameters())


# ---- save / load ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _same_behaviour(a, b):
    ids = random_ids(2, 7)
    assert torch.equal(a(ids).logits, b(ids).logits)
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(a.generate(ids, **kw), b.generate(ids, **kw))


def test_save_load_round_trip_from_member_dirs(tmp_path):
    hub_dir, expert_dirs = save_members(tmp_path, "mistral", 2)
    model = open_stitches(BTSForCausalLM.from_members(hub_dir, expert_dirs).eval())
    model.save_pretrained(tmp_path / "out")
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["config.json", "generation_config.json", "stitch.safetensors"]  # no member weights
    for loaded in (BTSForCausalLM.from_pretrained(tmp_path / "out"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "out")):
        assert isinstance(loaded, BTSForCausalLM)
        _same_behaviour(model, loaded)


def test_in_memory_members_are_written_and_export_is_self_contained(tmp_path):
    hub, experts = tiny_members("qwen2", 2)
    model = open_stitches(BTSForCausalLM.from_members(hub, experts, names=["code", "math"]).eval())
    model.save_pretrained(tmp_path / "mem")
    for name in ("hub", "code", "math"):
        assert (tmp_path / "mem" / "members" / name / "model.safetensors").exists()
    _same_behaviour(model, AutoModelForCausalLM.from_pretrained(tmp_path / "mem"))

    src = tmp_path / "src"
    hub_dir, expert_dirs = save_members(src, "llama", 2)
    model = open_stitches(BTSForCausalLM.from_members(hub_dir, expert_dirs).eval())
    model.save_pretrained(tmp_path / "export", export_members=True)
    shutil.rmtree(src)  # the original member dirs are gone: the export must not need them
    _same_behaviour(model, BTSForCausalLM.from_pretrained(tmp_path / "export"))


def test_tampered_member_and_truncated_stitches_are_refused(tmp_path):
    hub_dir, expert_dirs = save_members(tmp_path, "llama", 2)
    model = BTSForCausalLM.from_members(hub_dir, expert_dirs)
    model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "trunc")
    stitch = tmp_path / "trunc" / "stitch.safetensors"
    stitch.write_bytes(stitch.read_bytes()[:-100])
    with pytest.raises(BTSError, match="stitch.safetensors"):
        BTSForCausalLM.from_pretrained(tmp_path / "trunc")

    weights = f"{expert_dirs[1]}/model.safetensors"
    state = load_file(weights)
    key = next(iter(state))
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1.0
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(BTSError, match="member 'e1'"):
        BTSForCausalLM.from_pretrained(tmp_path / "out")
    # Exporting would copy weights the stitches were never trained with: refused before anything is written.
    with pytest.raises(BTSError, match="member 'e1'"):
        model.save_pretrained(tmp_path / "export", export_members=True)
    assert not (tmp_path / "export").exists()


def test_reloaded_export_can_be_saved_again_and_moved(tmp_path):
    hub_dir, expert_dirs = save_members(tmp_path / "src", "llama", 2)
    model = open_stitches(BTSForCausalLM.from_members(hub_dir, expert_dirs).eval())
    model.save_pretrained(tmp_path / "export", export_members=True)
    loaded = BTSForCausalLM.from_pretrained(tmp_path / "export")
    loaded.save_pretrained(tmp_path / "elsewhere")  # refers back to export/members/*
    loaded.save_pretrained(tmp_path / "export")  # in place: member paths stay relative
    shutil.move(tmp_path / "export", tmp_path / "moved")
    _same_behaviour(model, BTSForCausalLM.from_pretrained(tmp_path / "moved"))


# ---- introspection and layout ---------------------------------------------------------------------------------------
def test_gate_values_shapes_and_normalisation():
    _, model = _stitched("llama", 3)
    open_stitches(model)
    gates = model.gate_values(random_ids(2, 9))
    assert len(gates) == len(model.stitches) == 4
    for g, kind in zip(gates, model.config.stitch_kinds):
        assert g.shape == (2, 9, 4, 32) and not g.requires_grad
        if kind == E2H:
            torch.testing.assert_close(g.sum(-2), torch.ones(2, 9, 32))
        else:
            assert ((g > 0) & (g < 1)).all()


def test_stitch_placement():
    assert stitch_positions(20, 4) == [5, 10, 15, 20]
    assert stitch_positions(30, 4) == [8, 15, 23, 30]
    assert stitch_positions(20, 10) == list(range(2, 21, 2))
    assert stitch_positions(20, 1) == [20]
    assert stitch_kinds(4) == [H2E, E2H, H2E, E2H]
    assert stitch_kinds(3) == [E2H, H2E, E2H]  # odd K: assigned backwards, the last is E→H
    assert stitch_kinds(1) == [E2H]
    assert stitch_kinds(4, all_e2h=True) == [E2H] * 4
    _, model = _stitched("llama", 2, num_stitches=3)
    assert model.config.stitch_positions == [2, 3, 4] and model.config.stitch_kinds == [E2H, H2E, E2H]
    _, model = _stitched("llama", 2, positions=[1, 4], all_e2h=True)
    assert model.config.stitch_positions == [1, 4] and model.config.stitch_kinds == [E2H, E2H]


@pytest.mark.parametrize("init", ["blend", "bias", "mixturekit", "default"])
@pytest.mark.parametrize("kind", [E2H, H2E])
def test_stitch_parameter_count(init, kind):
    d, n = 32, 3
    layer = StitchLayer(d, n, kind, init=init)
    extra = {"blend": d if kind == E2H else n * d, "bias": (n + 1) * d}.get(init, 0)
    assert layer.num_paper_params() == (2 * n + 1) * d * d
    assert sum(p.numel() for p in layer.parameters()) == (2 * n + 1) * d * d + extra


def test_paper_parameter_count():
    with torch.device("meta"):  # 264M parameters: count them without allocating
        layers = [StitchLayer(3072, 3, kind) for kind in stitch_kinds(4)]
    assert sum(layer.num_paper_params() for layer in layers) == 264_241_152


# ---- the stitch equations and the expert_stream option ---------------------------------------------------------------
@pytest.mark.parametrize("init", ["mixturekit", "blend"])
@pytest.mark.parametrize("kind", [E2H, H2E])
@pytest.mark.parametrize("stream", ["projected", "raw"])
@torch.no_grad()
def test_stitch_equations_by_hand(init, kind, stream):
    d, n = 8, 3
    layer = StitchLayer(d, n, kind, init=init, expert_stream=stream)
    gen = torch.Generator().manual_seed(0)
    for p in layer.parameters():
        p.add_(0.5 * torch.randn(p.shape, generator=gen))
    h0, hs = torch.randn(2, 5, d, generator=gen), torch.randn(n, 2, 5, d, generator=gen)
    new_h0, new_hs = layer(h0, hs)
    z = (h0 @ layer.gate.weight.T).view(2, 5, n + 1, d)  # per channel, one logit per member
    a = torch.tanh(layer.blend) if layer.blend is not None else None
    proj = [hs[i] @ layer.proj[i].T for i in range(n)]
    if kind == E2H:
        g = torch.softmax(z, dim=2)
        mixed = g[:, :, 0] * h0 + sum(g[:, :, i + 1] * proj[i] for i in range(n))
        want_h0 = mixed if a is None else h0 + a[0] * (mixed - h0)
        want_hs = torch.stack(proj) if stream == "projected" else hs
        torch.testing.assert_close(new_h0, want_h0)
        torch.testing.assert_close(new_hs, want_hs)
        if stream == "raw":
            assert torch.equal(new_hs, hs)  # E→H leaves raw expert streams untouched
    else:
        g = torch.sigmoid(z)
        for i in range(n):
            mixed = (1 - g[:, :, i + 1]) * hs[i] + g[:, :, i + 1] * (h0 @ layer.proj[i].T)
            want = mixed if a is None else hs[i] + a[i] * (mixed - hs[i])
            torch.testing.assert_close(new_hs[i], want)
        assert torch.equal(new_h0, h0)  # H→E never changes the hub


@torch.no_grad()
def test_expert_stream_option_matters_once_projections_train():
    hub, experts = tiny_members("llama", 2)
    ids = random_ids()
    outs = {}
    for stream in ("projected", "raw"):
        model = BTSForCausalLM.from_members(hub, experts, positions=[1, 2, 3, 4], all_e2h=True,
                                            expert_stream=stream).eval()
        outs[stream] = open_stitches(model, seed=1)(ids).logits
    assert (outs["projected"] - outs["raw"]).abs().max() > 1e-4


def test_effective_mixing_weights_fold_in_the_blend():
    """At init the hub feeds itself entirely; once the blend opens, E→H weights still sum to 1 per channel."""
    from helpers import tiny_members

    hub, experts = tiny_members("llama", 2)
    model = BTSForCausalLM.from_members(hub, experts)
    ids = torch.randint(3, 90, (2, 7))
    for w, stitch in zip(model.gate_values(ids, effective=True), model.stitches):
        expected = torch.zeros_like(w)
        if stitch.kind == "e2h":
            expected[..., 0, :] = 1.0
        assert torch.equal(w, expected)
    with torch.no_grad():
        for s in model.stitches:
            s.blend.normal_()
            s.gate.weight.normal_()
    for w, stitch in zip(model.gate_values(ids, effective=True), model.stitches):
        if stitch.kind == "e2h":
            torch.testing.assert_close(w.sum(-2), torch.ones_like(w.sum(-2)))
        else:
            assert (w[..., 0, :] == 0).all() and (w.abs() <= 1).all()  # tanh(a) may be negative


def test_prompt_longer_than_the_context_is_refused():
    from helpers import tiny_members

    hub, experts = tiny_members("llama", 1, max_position_embeddings=16)
    model = BTSForCausalLM.from_members(hub, experts)
    model(input_ids=torch.randint(3, 90, (1, 16)))  # exactly the context is fine
    with pytest.raises(BTSError, match=r"input of 17 tokens is longer than the model's context "
                                       r"\(max_position_embeddings=16, set by member 'hub'"):
        model(input_ids=torch.randint(3, 90, (1, 17)))
    with pytest.raises(BTSError, match="longer than the model's context"):
        model.generate(input_ids=torch.randint(3, 90, (1, 12)), max_new_tokens=8, do_sample=False)


def test_context_is_the_shortest_member_and_a_longer_input_names_it():
    hub, _ = tiny_members("llama", 1)  # 128 positions
    _, (short,) = tiny_members("llama", 1, max_position_embeddings=16)
    model = BTSForCausalLM.from_members(hub, [short], names=["short"])
    assert model.config.max_position_embeddings == 16
    model(input_ids=torch.randint(3, 90, (1, 16)))
    with pytest.raises(BTSError) as info:
        model(input_ids=torch.randint(3, 90, (1, 17)))
    msg = str(info.value)
    assert "\n" not in msg and "max_position_embeddings=16" in msg and "member 'short'" in msg, msg


def test_members_given_by_relative_path_reload_from_anywhere(tmp_path, monkeypatch):
    hub, experts = save_members(tmp_path)
    monkeypatch.chdir(tmp_path)
    model = BTSForCausalLM.from_members("hub", ["e0", "e1"])
    model.save_pretrained("stitched")
    monkeypatch.chdir("/")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stitched")
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    import os

    umask = os.umask(0)
    os.umask(umask)
    mode = (tmp_path / "stitched" / "stitch.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask, oct(mode)  # follows the umask, not mkstemp's private 0600


def test_in_memory_members_take_the_requested_dtype():
    hub, experts = tiny_members("llama", 2)
    model = BTSForCausalLM.from_members(hub, experts, dtype=torch.bfloat16)
    assert {p.dtype for m in model.members() for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.stitch_parameters()} == {torch.float32}


def test_expert_heads_are_frozen_and_dropped_when_the_expert_is_on_disk(tmp_path):
    hub_dir, expert_dirs = save_members(tmp_path, "llama", 2)
    on_disk = BTSForCausalLM.from_members(hub_dir, expert_dirs)
    assert all(e.lm_head.weight.is_meta for e in on_disk._expert_models)  # written by copying files: no head needed
    hub, experts = tiny_members("llama", 2)
    in_memory = BTSForCausalLM.from_members(hub, experts)
    heads = [e.lm_head.weight for e in in_memory._expert_models]
    assert not any(h.is_meta or h.requires_grad for h in heads)  # kept, to be written out with the model
    on_disk.save_pretrained(tmp_path / "saved", export_members=True)
    again = BTSForCausalLM.from_pretrained(tmp_path / "saved")
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, on_disk(ids).logits)
