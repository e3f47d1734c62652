"""BTX: layout of the mixed weights, dense equivalence, routing variants, load balancing, training, save/load, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, VOCAB, save_members, tiny_members, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bts.baselines.btx import (ROUTINGS, BTXForCausalLM, btx_parameter_counts, btx_trainable_parameters, build_btx,
                               gumbel_temperature, load_btx, save_btx, set_btx_step)
from bts.baselines.btx_moe import FusedExperts, ModuleExperts
from bts.cli import main
from bts.errors import BTSError

IDS = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
FFN = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine OpenMP spinning made each training
    forward ~150x slower (index_add_ in Mixtral's expert loop)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def nll(model_logits, labels):
    return F.cross_entropy(model_logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


# ------------------------------------------------------------------- layout


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_identical_members_reproduce_the_dense_model(family, routing):
    """Every expert is the seed's FFN and the routing weights sum to 1, so the MoE is the dense model, in every
    family (the family's own body, FFN form and head: Gemma's GeLU, Phi-3's fused gate_up, Granite's scaling)."""
    seed = tiny_model(family)
    btx = build_btx(seed, [seed, seed], routing=routing)
    assert btx.config.num_local_experts == 3 and btx.config.bts_routing == routing
    assert btx.config.base_config.model_type == family and type(btx.model) is type(seed.model)
    assert all(isinstance(layer.mlp.experts, FusedExperts) for layer in btx.model.layers)
    assert torch.allclose(logits(btx), logits(seed), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_tied_embeddings_stay_tied(tie):
    seed = tiny_model("llama", tie_word_embeddings=tie)
    btx = build_btx(seed, [seed, seed])
    assert (btx.lm_head.weight is btx.model.embed_tokens.weight) == tie
    assert torch.allclose(logits(btx), logits(seed), atol=1e-5, rtol=0)


def test_an_ffn_of_another_form_runs_as_its_own_module():
    """FFNs outside the gated no-bias form (here Llama with mlp_bias) become copies of the family's FFN module."""
    seed, experts = tiny_members("llama", 2, mlp_bias=True)
    btx = build_btx(seed, experts)
    assert all(isinstance(layer.mlp.experts, ModuleExperts) for layer in btx.model.layers)
    x = torch.randn(5, seed.config.hidden_size)
    for e, member in enumerate([seed, *experts]):
        got = btx.model.layers[1].mlp.experts(x, torch.full((5, 1), e), torch.ones(5, 1))
        assert torch.allclose(got, member.model.layers[1].mlp(x), atol=1e-6, rtol=0)
    dense = build_btx(seed, [seed, seed])
    assert torch.allclose(logits(dense), logits(seed), atol=1e-5, rtol=0)
    counts = btx_parameter_counts(btx)
    ffn = sum(p.numel() for p in seed.model.layers[0].mlp.parameters())
    assert counts["total"] - counts["active"] == 4 * ffn  # top2 of 3: one idle expert per layer


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without(family):
    seed, experts = tiny_members(family, 2)
    for routing in ROUTINGS:
        btx = build_btx(seed, experts, routing=routing, router_init_std=1.0)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        cached = btx.generate(IDS, use_cache=True, **kw)
        assert torch.equal(cached, btx.generate(IDS, use_cache=False, **kw)), routing


@pytest.mark.parametrize("include_seed", [True, False])
def test_experts_are_member_ffns_and_the_rest_is_the_member_average(include_seed):
    seed, experts = tiny_members("llama", 2)
    btx = build_btx(seed, experts, include_seed=include_seed)
    members = ([seed] if include_seed else []) + experts
    states = [m.state_dict() for m in members]
    mixed = btx.state_dict()
    assert btx.config.num_local_experts == len(members)
    for key, value in states[0].items():
        if any(f"mlp.{name}" in key for name in FFN):
            continue
        mean = torch.stack([s[key] for s in states]).mean(0)
        assert torch.allclose(mixed[key], mean, atol=1e-7, rtol=0), key
        assert not torch.equal(mixed[key], states[0][key])  # the members differ, so averaging changed it
    F_ = seed.config.intermediate_size
    for layer in range(seed.config.num_hidden_layers):
        gate_up = mixed[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = mixed[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e, s in enumerate(states):
            prefix = f"model.layers.{layer}.mlp"
            assert torch.equal(gate_up[e, :F_], s[f"{prefix}.gate_proj.weight"])
            assert torch.equal(gate_up[e, F_:], s[f"{prefix}.up_proj.weight"])
            assert torch.equal(down[e], s[f"{prefix}.down_proj.weight"])


def test_expert_e_computes_member_e_ffn():
    """Routing every token to expert e alone gives member e's FFN output (fused layout read by Mixtral itself)."""
    seed, experts = tiny_members("llama", 2)
    btx = build_btx(seed, experts)
    x = torch.randn(5, seed.config.hidden_size)
    for e, member in enumerate([seed, *experts]):
        got = btx.model.layers[1].mlp.experts(x, torch.full((5, 1), e), torch.ones(5, 1))
        assert torch.allclose(got, member.model.layers[1].mlp(x), atol=1e-6, rtol=0)


def test_routers_are_new_seeded_and_scaled():
    seed, experts = tiny_members("llama", 2)
    a = build_btx(seed, experts, seed_rng=3, router_init_std=0.5)
    b = build_btx(seed, experts, seed_rng=3, router_init_std=0.5)
    c = build_btx(seed, experts, seed_rng=4, router_init_std=0.5)
    routers = lambda m: torch.stack([r.weight for r in m.routers()])  # noqa: E731
    assert torch.equal(routers(a), routers(b)) and not torch.equal(routers(a), routers(c))
    assert routers(a).shape == (4, 3, 32)
    assert 0.4 < routers(a).std().item() < 0.6
    assert len({r.weight.data_ptr() for r in a.routers()}) == 4  # one router per layer


def test_in_memory_members_are_not_modified():
    seed, experts = tiny_members("llama", 2)
    before = {k: v.clone() for k, v in seed.state_dict().items()}
    btx = build_btx(seed, experts)
    with torch.no_grad():
        for p in btx.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, seed.state_dict()[k]) for k, v in before.items())


# ------------------------------------------------------------------- routing and load balancing


def test_gumbel_temperature_schedule():
    assert gumbel_temperature(0) == 1.0
    assert math.isclose(gumbel_temperature(1000), math.exp(-0.1))
    assert math.isclose(gumbel_temperature(6000), math.exp(-0.6))
    assert gumbel_temperature(6932) == 0.5  # exp(-0.6932) < 0.5: the floor takes over at t = 1e4 ln 2
    assert gumbel_temperature(10**7) == 0.5


def routed(model, ids=IDS):
    """Each layer's (weights [T, k], indices [T, k]) as the routers returned them."""
    seen = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: seen.append((out[1], out[2]))) for r in model.routers()]
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_sampled_top1_trains_on_one_sampled_expert_and_infers_hard_top1():
    seed, experts = tiny_members("llama", 3)
    btx = build_btx(seed, experts, routing="sampled_top1", router_init_std=1.0)
    assert [r.top_k for r in btx.routers()] == [4, 1, 1, 1]  # the first layer routes softly
    btx.train()
    torch.manual_seed(0)
    layers = routed(btx)
    w0, i0 = layers[0]
    assert i0.shape[1] == 4 and torch.allclose(w0.sum(-1), torch.ones(len(w0)))
    picked = torch.cat([idx for _, idx in layers[1:]])
    weights = torch.cat([w for w, _ in layers[1:]])
    assert picked.shape[1] == 1 and (weights < 1).all() and (weights > 0).all()
    inputs = _router_inputs(btx)  # the same in train mode (no dropout); used to recompute the logits' argmax
    with torch.no_grad():
        argmax = [btx.model.layers[i].mlp.gate(h)[0].argmax(-1, keepdim=True) for i, h in enumerate(inputs)]
    assert (picked != torch.cat(argmax[1:])).any()  # a sample, not the argmax
    # A later step has a lower temperature, so the soft value of the picked expert is larger on average.
    torch.manual_seed(0)
    set_btx_step(btx, 10**6)
    assert torch.cat([w for w, _ in routed(btx)[1:]]).mean() > weights.mean()
    btx.eval()
    for i, (w, idx) in enumerate(routed(btx)[1:], start=1):
        assert torch.equal(w, torch.ones_like(w)) and torch.equal(idx, argmax[i])


def _router_inputs(model):
    seen = []
    hooks = [r.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].detach())) for r in model.routers()]
    try:
        with torch.no_grad():
            model(input_ids=IDS)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("routing", ROUTINGS)
def test_training_loss_is_nll_plus_btx_load_balancing(routing):
    seed, experts = tiny_members("llama", 2)
    btx = build_btx(seed, experts, routing=routing, router_init_std=1.0).train()
    mask = torch.ones_like(IDS)
    mask[1, :4] = 0  # left padding: excluded from u and p
    torch.manual_seed(1)
    captured = []
    hooks = [r.register_forward_hook(lambda m, _i, out: captured.append((m, out))) for r in btx.routers()]
    out = btx(input_ids=IDS, attention_mask=mask, labels=IDS, output_router_logits=True)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    expected = 0.0
    for router, (router_logits, weights, index) in captured:
        g = torch.zeros(len(router_logits), router.num_experts).scatter(-1, index, weights)
        p = router_logits.float().softmax(-1)
        expected = expected + router.num_experts * (g[keep].mean(0) * p[keep].mean(0)).sum()
    assert torch.allclose(out.aux_loss, expected, atol=1e-6)
    assert btx.config.router_aux_loss_coef == 0.01
    ce = btx.loss_function(out.logits, IDS, VOCAB)
    assert torch.allclose(out.loss, ce + 0.01 * expected, atol=1e-6)
    assert len(out.router_logits) == 4
    if routing == "soft":  # u = p: N * sum p^2, which the Switch form (constant N under k = N) cannot give
        p = captured[1][1][0].softmax(-1)[keep].mean(0)
        assert not torch.isclose(3 * (p * p).sum(), torch.tensor(1.0))
    # Evaluation: plain NLL, no load balancing.
    btx.eval()
    with torch.no_grad():
        ev = btx(input_ids=IDS, labels=IDS)
    assert ev.aux_loss is None and torch.allclose(ev.loss, nll(ev.logits, IDS), atol=1e-6)
    assert all(r.routed is None for r in btx.routers())  # no graph kept alive between steps


@pytest.mark.parametrize("routing", ROUTINGS)
def test_load_balancing_gradient_is_the_gradient_of_its_formula(routing):
    """The aux loss reaches every router (through p, and through u where the weights are differentiable)."""
    seed, experts = tiny_members("llama", 2)
    btx = build_btx(seed, experts, routing=routing, router_init_std=1.0).train()
    captured = []
    hooks = [r.register_forward_hook(lambda m, _i, out: captured.append((m, out))) for r in btx.routers()]
    torch.manual_seed(2)
    out = btx(input_ids=IDS)
    for h in hooks:
        h.remove()
    expected = 0.0
    for router, (router_logits, weights, index) in captured:
        g = torch.zeros(len(router_logits), router.num_experts).scatter(-1, index, weights)
        expected = expected + router.num_experts * (g.mean(0) * router_logits.float().softmax(-1).mean(0)).sum()
    weights = [r.weight for r in btx.routers()]
    got = torch.autograd.grad(out.aux_loss, weights, retain_graph=True)
    want = torch.autograd.grad(expected, weights)
    for a, b in zip(got, want):
        assert a.abs().sum() > 0 and torch.allclose(a, b, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains(family):
    seed, experts = tiny_members(family, 2)
    btx = build_btx(seed, experts, routing="sampled_top1").train()
    params = btx_trainable_parameters(btx, "full")
    out = btx(input_ids=IDS, labels=IDS)
    assert out.aux_loss > 0
    out.loss.backward()
    for name in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        assert params[f"model.layers.1.{name}"].grad.abs().sum() > 0, name


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("trainable", ["full", "router"])
def test_a_few_adamw_steps_reduce_the_loss(routing, trainable):
    # Members far apart with peaked outputs, so that which expert runs matters and router-only training can win.
    seed, experts = tiny_members("llama", 2, noise=1.0, initializer_range=0.2)
    btx = build_btx(seed, experts, routing=routing).train()
    params = btx_trainable_parameters(btx, trainable)
    opt = torch.optim.AdamW(params.values(), lr=1e-2 if trainable == "full" else 5e-2)
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    losses = []
    for step in range(8):
        set_btx_step(btx, step)
        out = btx(input_ids=ids, labels=ids)
        assert out.aux_loss is not None and out.aux_loss > 0
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses


def test_router_only_training_touches_only_the_routers():
    seed, experts = tiny_members("llama", 2)
    btx = build_btx(seed, experts).train()
    params = btx_trainable_parameters(btx, "router")
    assert sorted(params) == [f"model.layers.{i}.mlp.gate.weight" for i in range(4)]
    assert {n for n, p in btx.named_parameters() if p.requires_grad} == set(params)
    before = {k: v.clone() for k, v in btx.state_dict().items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    btx(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    for k, v in btx.state_dict().items():
        assert torch.equal(v, before[k]) != k.endswith("mlp.gate.weight"), k
    full = btx_trainable_parameters(btx, "full")
    assert len(full) == len(list(btx.parameters())) and all(p.requires_grad for p in btx.parameters())


def test_parameter_counts():
    seed, experts = tiny_members("llama", 2)
    dense = sum(p.numel() for p in seed.parameters())
    d, f, layers, n = 32, 64, 4, 3
    ffn, router = 3 * d * f, n * d
    shared = dense - layers * ffn
    expect = {"top2": shared + layers * (2 * ffn + router), "soft": shared + layers * (n * ffn + router),
              "sampled_top1": shared + (n * ffn + router) + (layers - 1) * (ffn + router)}
    for routing, active in expect.items():
        btx = build_btx(seed, experts, routing=routing)
        counts = btx_parameter_counts(btx)
        assert counts["total"] == shared + layers * (n * ffn + router)
        assert counts["active"] == active and counts["trainable"] == counts["total"]
    btx_trainable_parameters(btx, "router")
    assert btx_parameter_counts(btx)["trainable"] == layers * router


# ------------------------------------------------------------------- save and load


@pytest.mark.parametrize("routing", ROUTINGS)
def test_save_loads_with_plain_transformers(tmp_path, routing):
    hub, experts = save_members(tmp_path, "llama", 2)
    btx = build_btx(hub, experts, routing=routing)
    save_btx(btx, tmp_path / "btx")
    config = json.loads((tmp_path / "btx" / "config.json").read_text())
    assert config["model_type"] == "bts_btx" and config["architectures"] == ["BTXForCausalLM"]
    assert config["bts_routing"] == routing and config["base_config"]["model_type"] == "llama"
    assert config["output_router_logits"] is True and config["router_aux_loss_coef"] == 0.01
    provenance = json.loads((tmp_path / "btx" / "bts_btx.json").read_text())
    assert [e["path"] for e in provenance["experts"]] == [hub, *experts]
    loaded = load_btx(tmp_path / "btx")
    assert torch.equal(logits(loaded), logits(btx))
    assert torch.equal(loaded.generate(IDS[:1], max_new_tokens=3, do_sample=False),
                       btx.generate(IDS[:1], max_new_tokens=3, do_sample=False))
    loaded.train()
    torch.manual_seed(0)
    as_tuple = loaded(input_ids=IDS, labels=IDS, return_dict=False)
    torch.manual_seed(0)
    as_dict = loaded(input_ids=IDS, labels=IDS)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.aux_loss)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "btx").eval()  # every routing, the first layer too
    assert type(plain) is BTXForCausalLM and [r.top_k for r in plain.routers()] == [r.top_k for r in btx.routers()]
    assert torch.equal(logits(plain), logits(btx))


@pytest.mark.parametrize("family", ["gemma", "phi3", "olmo2"])
def test_save_load_round_trip_beyond_mixtral_families(tmp_path, family):
    seed, experts = tiny_members(family, 2)
    btx = build_btx(seed, experts, routing="sampled_top1")
    save_btx(btx, tmp_path / "btx")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "btx").eval()
    assert type(plain) is BTXForCausalLM and plain.config.base_config.model_type == family
    assert torch.equal(logits(plain), logits(btx))
    assert torch.equal(logits(load_btx(tmp_path / "btx")), logits(btx))
    with pytest.raises(BTSError, match="needs a Llama or Mistral seed"):
        save_btx(btx, tmp_path / "mixtral", export="mixtral")
    assert not (tmp_path / "mixtral").exists()


@pytest.mark.parametrize("arch, routing", [("llama", "top2"), ("llama", "soft"), ("llama", "sampled_top1"),
                                           ("mistral", "top2")])
def test_mixtral_export_is_a_stock_mixtral_and_loads_back(tmp_path, arch, routing):
    """export="mixtral" writes what bts wrote before bts_btx: a stock Mixtral folder (plus bts_routing), so folders
    written by the old code load with load_btx too."""
    hub, experts = save_members(tmp_path, arch, 2, tie_word_embeddings=routing == "soft")
    btx = build_btx(hub, experts, routing=routing)
    save_btx(btx, tmp_path / "m", export="mixtral")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert config["bts_routing"] == routing
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(plain).__name__ == "MixtralForCausalLM"
    if routing != "sampled_top1":  # plain Mixtral has one k for all layers; BTX's soft first layer needs load_btx
        # (a plain load runs Mixtral's grouped_mm experts kernel, which sums in another order than the expert loop)
        assert torch.allclose(logits(plain), logits(btx), atol=1e-6, rtol=0)
    loaded = load_btx(tmp_path / "m")
    assert type(loaded) is BTXForCausalLM and loaded.config.bts_routing == routing
    assert loaded.config.base_config.model_type == "llama"  # a Mixtral folder without sliding window: Llama's body
    assert torch.equal(logits(loaded), logits(btx))
    assert loaded.state_dict().keys() == btx.state_dict().keys()


def test_mixtral_checkpoint_without_bts_routing_loads_as_top2(tmp_path):
    hub, experts = save_members(tmp_path, "llama", 2)
    save_btx(build_btx(hub, experts), tmp_path / "m", export="mixtral")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    del config["bts_routing"]
    path.write_text(json.dumps(config))
    assert load_btx(tmp_path / "m").config.bts_routing == "top2"


def test_save_refuses_non_empty_out_and_writes_nothing_on_refusal(tmp_path):
    seed, experts = tiny_members("llama", 1)
    btx = build_btx(seed, experts)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(BTSError, match="not empty"):
        save_btx(btx, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    save_btx(btx, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging leftovers


# ------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_user_errors(tmp_path):
    seed, experts = tiny_members("llama", 2)
    with pytest.raises(BTSError, match="routing 'top3'"):
        build_btx(seed, experts, routing="top3")
    with pytest.raises(BTSError, match="at least 2 MoE experts, got 1"):
        build_btx(seed, experts[:1], include_seed=False)
    with pytest.raises(BTSError, match="router_init_std"):
        build_btx(seed, experts, router_init_std=0.0)
    with pytest.raises(BTSError, match="expert 1 path"):
        build_btx(seed, [str(tmp_path / "missing")])
    with pytest.raises(BTSError, match="trainable 'lora'"):
        btx_trainable_parameters(build_btx(seed, experts), "lora")
    with pytest.raises(BTSError, match="step must be >= 0"):
        set_btx_step(build_btx(seed, experts), -1)
    with pytest.raises(BTSError, match="no config.json"):
        load_btx(tmp_path)


def test_mismatched_members_are_refused():
    seed = tiny_model("llama")
    with pytest.raises(BTSError, match="down_proj.weight of shape"):
        build_btx(seed, [tiny_model("llama", intermediate_size=48)])
    with pytest.raises(BTSError, match="rms_norm_eps"):
        build_btx(seed, [tiny_model("llama", rms_norm_eps=1e-3)])
    with pytest.raises(BTSError, match="model_type"):
        build_btx(seed, [tiny_model("mistral")])
    with pytest.raises(BTSError, match="export 'gguf'"):
        save_btx(build_btx(seed, [seed]), "unused", export="gguf")
    b_seed, b_experts = tiny_members("llama", 1, attention_bias=True)
    with pytest.raises(BTSError, match="attention_bias=True"):
        save_btx(build_btx(b_seed, b_experts), "unused", export="mixtral")


# ------------------------------------------------------------------- the CLI


def test_cli_builds_refuses_and_writes_nothing_on_error(tmp_path, capsys):
    hub, experts = save_members(tmp_path, "llama", 2)
    (tmp_path / "hub" / "tokenizer.json").write_text("{}")  # copied as is from the seed
    out = tmp_path / "btx"
    argv = ["btx", "--seed", hub, "--experts", *experts, "--out", str(out), "--routing", "sampled_top1"]
    assert main(argv) == 0
    assert "sampled_top1 (bts_btx) with 3 experts" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_text() == "{}"
    first = load_file(out / "model.safetensors")
    model = load_btx(out)
    assert model.config.num_local_experts == 3 and [r.top_k for r in model.routers()] == [3, 1, 1, 1]

    assert main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0  # seeded: the same model again
    assert all(torch.equal(v, first[k]) for k, v in load_file(out / "model.safetensors").items())
    assert main(["btx", "--seed", hub, "--experts", *experts, "--out", str(tmp_path), "--force"]) == 2
    assert "member directory" in capsys.readouterr().err

    bad = tmp_path / "bad"
    assert main(["btx", "--seed", hub, "--experts", experts[0], "--out", str(bad), "--no-seed-expert"]) == 2
    assert "at least 2 MoE experts" in capsys.readouterr().err
    assert not bad.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert main(["btx", "--seed", hub, "--experts", *experts, "--out", str(bad), "--no-seed-expert"]) == 0
    assert load_btx(bad).config.num_local_experts == 2
    mixtral = tmp_path / "mixtral"
    assert main(["btx", "--seed", hub, "--experts", *experts, "--out", str(mixtral), "--mixtral"]) == 0
    assert json.loads((mixtral / "config.json").read_text())["model_type"] == "mixtral"
    assert torch.equal(logits(load_btx(mixtral)), logits(build_btx(hub, experts)))  # seeded: the same top2 model


# ------------------------------------------------------------------- against mergekit 0.1.5


def test_layout_matches_mergekit_moe(tmp_path):
    """mergekit: a linear merge of all members, then mergekit-moe on it with each member as one expert, is BTX's
    initialisation up to the (random) routers."""
    pytest.importorskip("mergekit")
    from mergekit.merge import MergeOptions, run_merge
    from mergekit.config import MergeConfiguration
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build as moe_build
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hub, experts = save_members(tmp_path, "llama", 2)
    members = [hub, *experts]
    options = MergeOptions(device="cpu", random_seed=0, quiet=True)
    run_merge(MergeConfiguration.model_validate({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": p, "parameters": {"weight": 1.0}} for p in members]}), str(tmp_path / "avg"),
        options=options)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                            bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path / "avg")
    moe_build(MoEMergeConfig.model_validate({
        "base_model": str(tmp_path / "avg"), "gate_mode": "random", "experts_per_token": 2, "dtype": "float32",
        "experts": [{"source_model": p} for p in members]}), str(tmp_path / "moe"), options, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").state_dict()
    ours = build_btx(hub, experts).state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        if not key.endswith("mlp.gate.weight"):
            assert torch.allclose(theirs[key], value, atol=1e-6, rtol=0), key
