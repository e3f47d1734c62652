"""The execution paths of BTSForCausalLM (batched members, checkpointed member blocks) against the reference path
(one Hugging Face layer call per member): same logits, same cached decoding, same gradients, same frozen members."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import VOCAB, open_stitches, random_ids, tiny_members
from transformers import AutoModelForCausalLM, Qwen3Config

from bts import BTSError, BTSForCausalLM
from bts.core import hf
from bts.core.runners import BatchedRunner, Checkpointed, LoopRunner

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def _members(arch, n=3):
    if arch != "qwen3":
        return tiny_members(arch, n)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    models = []
    for seed in range(n + 1):
        torch.manual_seed(seed)
        models.append(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval())
    return models[0], models[1:]


def _pair(arch="llama", n=3, **kw):
    """A reference model and a batched copy of it (same members, same stitch weights)."""
    hub, experts = _members(arch, n)
    ref = open_stitches(BTSForCausalLM.from_members(hub, experts, **kw)).eval()
    ref.set_execution("loop")
    fast = copy.deepcopy(ref)
    fast.set_execution("batched")
    return ref, fast


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_forward_equals_reference(arch):
    ref, fast = _pair(arch)
    ids = random_ids(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the shared mask must reach every member
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            a, b = ref(ids, **kwargs).logits, fast(ids, **kwargs).logits
            assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batched_generate_with_cache_equals_reference_and_uncached(arch):
    ref, fast = _pair(arch)
    prompt = random_ids(1, 6)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        want = ref.generate(prompt, **kw)
        assert torch.equal(fast.generate(prompt, **kw), want)
        assert torch.equal(fast.generate(prompt, use_cache=False, **kw), want)


def test_batched_sparse_equals_reference_sparse():
    ref, fast = _pair("llama", n=3)
    ids = random_ids()
    with torch.no_grad():
        for active in (["expert2"], ["expert1", "expert3"], None):
            ref.set_active_experts(active)
            fast.set_active_experts(active)
            assert (ref(ids).logits - fast(ids).logits).abs().max() <= 1e-5
            out = fast.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
            assert torch.equal(out, ref.generate(ids[:1, :5], max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("batched", [False, True])
def test_checkpointed_members_give_the_same_gradients(batched):
    ref, _ = _pair("llama", n=2)
    other = copy.deepcopy(ref)
    other.set_execution("batched" if batched else "loop", checkpoint_members=True)
    ids = random_ids()
    grads = []
    for model in (ref, other):
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.stitch_parameters()])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("members", ["loop", "batched"])
def test_checkpointing_wraps_either_runner_and_changes_no_bit(members):
    ref, _ = _pair("llama", n=2, positions=[2, 3], gate_dropout=0.1)  # hub-only block 3; dropout: RNG replayed
    ref.set_execution(members)
    other = copy.deepcopy(ref)
    other.set_execution(checkpoint_members=True)
    ids = random_ids()
    results = []
    for model in (ref, other):
        model.train()
        torch.manual_seed(0)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append([loss] + [p.grad for p in model.stitch_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_runner_follows_the_execution_settings():
    ref, _ = _pair("llama", n=2)
    cache = hf.new_cache(ref.config)
    for members, cached, runner in [("loop", True, LoopRunner), ("batched", False, BatchedRunner),
                                    ("auto", False, LoopRunner), ("auto", True, BatchedRunner)]:
        ref.set_execution(members)
        assert type(ref._runner(cache if cached else None, use_cache=cached)) is runner
    ref.set_execution("batched", checkpoint_members=True)
    wrapped = ref._runner(None, use_cache=False)
    assert isinstance(wrapped, Checkpointed) and type(wrapped.inner) is BatchedRunner
    with torch.no_grad():  # nothing to recompute without a graph, nor with a cache
        assert type(ref._runner(None, use_cache=False)) is BatchedRunner
    assert type(ref._runner(cache, use_cache=True)) is BatchedRunner
    ref.set_active_experts(["expert2"])  # a sparse subset: the runner runs the hub and that expert only
    assert ref._runner(None, use_cache=False).inner.decoders == [ref.hub.model, ref.experts[1]]


def test_batched_members_share_storage_and_stay_frozen():
    ref, fast = _pair("llama", n=2)
    before = {k: v.clone() for k, v in fast.hub.state_dict().items()}
    ids = random_ids()
    fast.train()
    fast(ids, labels=ids).loss.backward()
    torch.optim.AdamW(fast.stitch_parameters(), lr=1e-2).step()
    # batching costs no second copy: each member weight is a slice of its block's stack
    stack = fast._stacks.blocks[0].weights["q"]
    assert fast.hub.model.layers[0].self_attn.q_proj.weight.data_ptr() == stack[0].data_ptr()
    assert all(torch.equal(v, fast.hub.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for m in fast.members() for p in m.parameters())


def test_batched_members_rebuild_after_a_dtype_change_and_refuse_mixed_dtypes():
    _, fast = _pair("llama", n=2)
    ids = random_ids()
    with torch.no_grad():
        fast(ids)
        fast.to(torch.bfloat16)
        out = fast(ids).logits  # stacks rebuilt in bf16, not the stale fp32 ones
        assert torch.isfinite(out).all()
        fast.experts[0].to(torch.float32)
        with pytest.raises(BTSError, match="one dtype"):
            fast(ids)


def test_auto_execution_batches_only_generation_and_rejects_unknown_modes():
    ref, _ = _pair("llama", n=2)
    auto = copy.deepcopy(ref)
    auto.set_execution("auto")
    ids = random_ids(1, 6)
    with torch.no_grad():
        auto(ids)  # no cache: the reference path, nothing stacked
        assert auto._stacks.blocks is None
        out = auto.generate(ids, max_new_tokens=5, do_sample=False)
        assert auto._stacks.blocks is not None
        assert torch.equal(out, ref.generate(ids, max_new_tokens=5, do_sample=False))
    assert auto.execution == {"members": "auto", "checkpoint_members": False}
    with pytest.raises(BTSError, match="one of auto, loop, batched"):
        auto.set_execution("fast")


def test_members_saved_after_batched_generation_reload_identically(tmp_path):
    _, fast = _pair("llama", n=2)
    ids = random_ids(1, 6)
    with torch.no_grad():
        want = fast(ids).logits
        fast.generate(ids, max_new_tokens=3, do_sample=False)  # members now live in the stacks
    fast.save_pretrained(tmp_path / "m")  # in-memory members are written into the folder
    again = BTSForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert (again(ids).logits - want).abs().max() <= 1e-5
