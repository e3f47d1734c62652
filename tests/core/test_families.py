"""Every supported family (bts.core.families), and members that differ in what the stitch does not need.

Per family: starts as the hub exactly; generate with a cache equals generate without, and at init the hub's own
greedy output; causal with open stitches; the batched path equals the loop (or is refused in one line, with "auto"
falling back to the loop); save → load round trip. Then: each member runs as itself (its own rotary θ / scaling,
embedding scale), stays itself on its own after stitching, and the context is the shortest member's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FAMILIES, assert_causal, open_stitches, random_ids, save_members, tiny_members, tiny_model

from bts import BTSError, BTSForCausalLM
from bts.core.families import FAMILIES as TABLE
from bts.core.stitch import E2H

GREEDY = dict(do_sample=False, eos_token_id=None)


def test_the_family_table_and_the_test_helpers_list_the_same_families():
    assert tuple(TABLE) == FAMILIES


@pytest.mark.parametrize("arch", FAMILIES)
@torch.no_grad()
def test_starts_as_the_hub_and_generates_like_it(arch):
    hub, experts = tiny_members(arch, 2)
    model = BTSForCausalLM.from_members(hub, experts).eval()
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding reaches every member's masks
    assert torch.equal(model(ids, attention_mask=mask).logits, hub(ids, attention_mask=mask).logits.float())
    prompt = random_ids(1, 6)
    want = hub.generate(prompt, max_new_tokens=12, **GREEDY)  # past gemma's sliding window of 8
    assert torch.equal(model.generate(prompt, max_new_tokens=12, **GREEDY), want)


@pytest.mark.parametrize("arch", FAMILIES)
@torch.no_grad()
def test_cached_generation_equals_uncached_with_open_stitches(arch):
    hub, experts = tiny_members(arch, 2)
    model = open_stitches(BTSForCausalLM.from_members(hub, experts).eval(), scale=0.1)
    prompt = random_ids(2, 6)
    kw = dict(max_new_tokens=12, min_new_tokens=12, output_logits=True, return_dict_in_generate=True, **GREEDY)
    cached, uncached = model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(cached.logits, uncached.logits)) <= 1e-4


@pytest.mark.parametrize("arch", FAMILIES)
@torch.no_grad()
def test_causal_with_open_stitches(arch):
    hub, experts = tiny_members(arch, 2)
    model = open_stitches(BTSForCausalLM.from_members(hub, experts).eval())
    assert_causal(model, random_ids(1, 12), (0, 5, 10))


@pytest.mark.parametrize("arch", FAMILIES)
@torch.no_grad()
def test_batched_equals_the_loop_or_is_refused_in_one_line(arch):
    hub, experts = tiny_members(arch, 2)
    loop = open_stitches(BTSForCausalLM.from_members(hub, experts).eval(), scale=0.1)
    loop.set_execution("loop")
    prompt = random_ids(1, 6)
    want = loop.generate(prompt, max_new_tokens=10, **GREEDY)
    auto = copy.deepcopy(loop)
    auto.set_execution("auto")
    if TABLE[arch].batched:
        fast = copy.deepcopy(loop)
        fast.set_execution("batched")
        ids = random_ids(2, 9)
        assert (fast(ids).logits - loop(ids).logits).abs().max() <= 1e-5
        assert torch.equal(fast.generate(prompt, max_new_tokens=10, **GREEDY), want)
    else:
        with pytest.raises(BTSError) as info:
            auto.set_execution("batched")
        msg = str(info.value)
        assert "\n" not in msg and arch in msg and "loop" in msg, msg
        assert auto.execution["members"] == "auto"
    assert torch.equal(auto.generate(prompt, max_new_tokens=10, **GREEDY), want)  # auto: batched or the loop


@pytest.mark.parametrize("arch", FAMILIES)
@torch.no_grad()
def test_save_load_round_trip(tmp_path, arch):
    hub_dir, expert_dirs = save_members(tmp_path, arch, 2)
    model = open_stitches(BTSForCausalLM.from_members(hub_dir, expert_dirs).eval())
    model.save_pretrained(tmp_path / "out")
    loaded = BTSForCausalLM.from_pretrained(tmp_path / "out")
    ids = random_ids(2, 7)
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.equal(model.generate(ids, max_new_tokens=5, **GREEDY), loaded.generate(ids, max_new_tokens=5, **GREEDY))


# ---- each member runs as itself ------------------------------------------------------------------------------------
LLAMA3 = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
ROPE_CASES = {  # (family, the hub's overrides, the expert's)
    "qwen2-theta": ("qwen2", dict(rope_theta=1e6), dict(rope_theta=1e4)),
    "llama-llama3": ("llama", {}, dict(rope_parameters=LLAMA3)),
    "gemma-theta": ("gemma", {}, dict(rope_theta=10.0)),
    "mistral-linear": ("mistral", {}, dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=4.0))),
    "qwen3-dynamic": ("qwen3", {}, dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e3, factor=2.0,
                                                             original_max_position_embeddings=8))),
    "granite-yarn": ("granite", dict(logits_scaling=1.0), dict(logits_scaling=1.0, rope_parameters=dict(
        rope_type="yarn", rope_theta=10.0, factor=4.0, original_max_position_embeddings=32))),
    "phi3-longrope": ("phi3", {}, dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 4,
                                                            long_factor=[4.0] * 4),
                                       original_max_position_embeddings=8)),
    "gemma3-local-global": ("gemma3_text", {}, dict(rope_parameters={
        "sliding_attention": dict(rope_type="default", rope_theta=1e3),
        "full_attention": dict(rope_type="linear", rope_theta=1e5, factor=2.0)})),
    "gemma2-window": ("gemma2", {}, dict(sliding_window=4, rope_theta=1e5)),
    "mistral-window": ("mistral", dict(sliding_window=4), dict(sliding_window=None)),
}


def routed_to_expert(hub, expert, **kw):
    """A stitched model whose last E→H takes the expert's stream entirely (mixing weight exactly 1, identity
    projection) and whose other stitches change nothing (saturated bias init, β large enough that the gates are
    exactly 0 / 1 in fp32)."""
    model = BTSForCausalLM.from_members(hub, [expert], init="bias", beta=1e4, **kw).eval()
    last = max(i for i, k in enumerate(model.config.stitch_kinds) if k == E2H)
    with torch.no_grad():
        bias = model.stitches[last].gate.bias.view(2, -1)
        bias[0].fill_(-1e4)  # hub
        bias[1].fill_(1e4)  # expert
    return model


def _expert_like_hub(arch, hub_kw, expert_kw, same_weights):
    hub = tiny_model(arch, seed=0, **hub_kw)
    expert = tiny_model(arch, seed=0, **expert_kw)
    if not same_weights:  # other blocks; the hub's final norm and head, so the hub's output is the expert's own
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in expert.model.layers.named_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3))
    return hub, expert


@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("same_weights", [True, False])
@torch.no_grad()
def test_an_expert_routed_to_fully_is_computed_as_itself(case, same_weights):
    """The stitched output equals the expert alone, however its rotary (θ, scaling) or window differs from the
    hub's: before members ran as themselves, qwen2 θ 1e4 under a θ 1e6 hub was 5.7e-3 off."""
    arch, hub_kw, expert_kw = ROPE_CASES[case]
    hub, expert = _expert_like_hub(arch, hub_kw, expert_kw, same_weights)
    ids = random_ids(2, 40)  # long enough for rotary (and window) differences to show
    want = expert(ids).logits
    assert (hub(ids).logits - want).abs().max() > 1e-4  # the two really compute differently
    model = routed_to_expert(hub, expert)
    assert (model(ids).logits - want).abs().max() <= 1e-5
    out = model.generate(ids[:1, :6], max_new_tokens=8, **GREEDY)
    assert torch.equal(out, expert.generate(ids[:1, :6], max_new_tokens=8, **GREEDY))


@torch.no_grad()
def test_members_stay_themselves_and_one_member_serves_two_models():
    hub, (e0, e1) = tiny_members("qwen2", 2)
    prompt = random_ids(2, 6)
    kw = dict(max_new_tokens=8, output_logits=True, return_dict_in_generate=True, **GREEDY)
    unfrozen = e1.generate(prompt, **kw)
    # Stitching freezes a member (requires_grad off), which alone moves torch's matmul for generate's last-token
    # slice onto another kernel (measured: 6e-8 on the first step's logits, same tokens). Everything else of the
    # member stays as it was, to the bit:
    e1.requires_grad_(False)
    alone = e1.generate(prompt, **kw)
    assert torch.equal(alone.sequences, unfrozen.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(alone.logits, unfrozen.logits)) <= 1e-6
    both = open_stitches(BTSForCausalLM.from_members(hub, [e0, e1]).eval())  # e1: cache slots 2L..3L-1
    only = open_stitches(BTSForCausalLM.from_members(hub, [e1]).eval())  # e1: slots L..2L-1
    first = both.generate(prompt, **kw)
    only.generate(prompt, **kw)  # the same e1 object, in another slot of another model's cache
    again = e1.generate(prompt, **kw)  # on its own: before, its layer_idx pointed past its own cache (IndexError)
    assert torch.equal(again.sequences, alone.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, alone.logits))  # bit-identical
    second = both.generate(prompt, **kw)
    assert torch.equal(second.sequences, first.sequences)
    assert all(torch.equal(a, b) for a, b in zip(second.logits, first.logits))
    assert all(layer.self_attn.layer_idx == i for i, layer in enumerate(e1.model.layers))  # never rewritten


def _write_tokenizer(folder, n_tokens):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {w: i for i, w in enumerate(["[UNK]", *(f"w{i}" for i in range(n_tokens - 1))])}
    Tokenizer(WordLevel(vocab, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))


def test_padding_rows_are_accepted_with_one_tokenizer_and_never_produced(tmp_path):
    members = {"hub": tiny_model("llama", vocab_size=80),  # 16 padding rows past the 64 tokens
               "e0": tiny_model("llama", seed=1, vocab_size=64),
               "small": tiny_model("llama", seed=2, vocab_size=60)}  # fewer rows than tokens
    for name, member in members.items():
        member.save_pretrained(tmp_path / name)
        _write_tokenizer(tmp_path / name, 64)
    model = open_stitches(BTSForCausalLM.from_members(str(tmp_path / "hub"), [str(tmp_path / "e0")]).eval())
    ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape[-1] == 80 and (logits[..., 64:] == torch.finfo(logits.dtype).min).all()
        assert int(model.generate(ids, max_new_tokens=10, **GREEDY).max()) < 64
        with pytest.raises(BTSError, match="outside the vocabulary every member shares"):
            model(torch.full((1, 3), 70))
    with pytest.raises(BTSError) as info:
        BTSForCausalLM.from_members(str(tmp_path / "hub"), [str(tmp_path / "small")])
    msg = str(info.value)
    assert "\n" not in msg and "'small'" in msg and "vocab_size=60" in msg and "vocab_size=80" in msg, msg


def test_members_differing_in_rope_and_context_are_accepted_and_inspect_lists_how(tmp_path, capsys):
    from bts.cli import build_parser

    hub = tiny_model("qwen2", rope_theta=1e6)
    math = tiny_model("qwen2", seed=1, max_position_embeddings=64,
                      rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0))
    BTSForCausalLM.from_members(hub, [math], names=["math"]).save_pretrained(tmp_path / "m")
    args = build_parser().parse_args(["inspect", str(tmp_path / "m")])
    assert args._run(args) == 0
    out = capsys.readouterr().out
    assert "hub              rope θ=1e+06 default  context 128  dtype float32  vocab rows 97" in out, out
    assert "math             rope θ=10000 linear×2.0*  context 64*" in out, out
    assert "context: 64 tokens (the shortest member's, 'math')" in out, out


@torch.no_grad()
def test_members_in_different_dtypes_each_keep_their_own():
    hub, (expert,) = tiny_members("llama", 1)
    hub.to(torch.bfloat16)
    model = open_stitches(BTSForCausalLM.from_members(hub, [expert]).eval(), scale=0.1)
    assert {p.dtype for p in model.experts[0].parameters()} == {torch.float32}
    ids = random_ids(1, 6)
    assert torch.isfinite(model(ids).logits).all()
    out = model.generate(ids, max_new_tokens=6, **GREEDY)  # "auto": the loop, as the dtypes differ
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, use_cache=False, **GREEDY))


@torch.no_grad()
def test_a_mistral_window_without_layer_types_slides_in_every_block():
    from bts.core import hf

    hub, experts = tiny_members("mistral", 2, sliding_window=4)
    assert hf.layer_types(hub.config) == ["sliding_attention"] * 4  # as MistralModel masks it
    model = BTSForCausalLM.from_members(hub, experts).eval()
    ids = random_ids(2, 12)
    assert torch.equal(model(ids).logits, hub(ids).logits)
    prompt = random_ids(1, 6)
    for execution in ("loop", "batched"):
        model.set_execution(execution)
        assert torch.equal(model.generate(prompt, max_new_tokens=10, **GREEDY),
                           hub.generate(prompt, max_new_tokens=10, **GREEDY))
