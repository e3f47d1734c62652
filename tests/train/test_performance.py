"""Memory invariants behind the P4 benchmark (benchmarks/bench_memory.py), asserted rather than measured.

Covered elsewhere, not repeated here: frozen members bit-identical after a hand-written training loop and no
autograd graph before the first stitch (test_model.py), the hub unchanged after bts.train.loop (test_train.py),
bf16 member / fp32 stitch dtypes (test_model.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, tiny_members

from bts import BTSForCausalLM
from bts.train import loop as train_module
from bts.data.streams import Batcher
from bts.train.config import TrainConfig


def _batcher():
    gen = torch.Generator().manual_seed(0)
    streams = {"a": torch.randint(3, VOCAB, (1000,), generator=gen)}
    return Batcher(streams, {"a": 1.0}, seq_len=12, batch_size=2, grad_accum=1, seed=1)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bts_train_gives_members_no_grad_and_no_optimizer_state(tmp_path, monkeypatch, dtype):
    """Through bts.train.loop's own loop (bf16: autocast, as the recipe's dtype option does): no member parameter
    gets a .grad or optimizer state, the optimizer holds exactly the stitch parameters, and every member —
    the experts' unused LM heads included — stays bit-identical."""
    hub, experts = tiny_members("llama", 2)
    model = BTSForCausalLM.from_members(hub, experts, positions=[1, 3])
    full_members = [hub, *experts]
    member_params = [p for m in full_members for p in m.parameters()]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in full_members]
    captured, grads_seen = [], []

    def capture(trainable, cfg):  # bts.train.loop's own optimizer, watched just before each step
        opt = make_optimizer(trainable, cfg)
        opt.register_step_pre_hook(lambda *_: grads_seen.append(
            ({id(p): p.grad for p in member_params}, {id(p): p.grad for p in model.stitch_parameters()})))
        captured.append(opt)
        return opt

    make_optimizer = train_module.make_optimizer
    monkeypatch.setattr(train_module, "make_optimizer", capture)
    trainable = dict(model.stitches.named_parameters())
    cfg = TrainConfig(steps=2, lr=1e-2, warmup=1, batch_size=2, log_every=1, ckpt_every=2, dtype=dtype)
    train_module.train(model, trainable, _batcher(), cfg, tmp_path, desc="stitch")

    (opt,) = captured
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.stitch_parameters()} and len(held) == len(trainable)
    assert not any(p in opt.state for p in member_params)
    assert {id(p) for p in opt.state} == {id(p) for p in held}  # every stitch tensor has Adam moments
    assert len(grads_seen) == cfg.steps
    member_grads, stitch_grads = grads_seen[-1]
    assert all(g is None for g in member_grads.values())
    assert all(g is not None and g.dtype == torch.float32 for g in stitch_grads.values())
    assert all(p.grad is None for p in member_params)
    assert not any(p.requires_grad for m in model.members() for p in m.parameters())
    for m, saved in zip(full_members, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, saved[k]), k


def test_bf16_members_halve_member_bytes_and_keep_stitch_bytes():
    fp32 = BTSForCausalLM.from_members(*tiny_members("llama", 3))
    hub, experts = tiny_members("llama", 3)
    bf16 = BTSForCausalLM.from_members(hub.to(torch.bfloat16), [e.to(torch.bfloat16) for e in experts])
    member_bytes = lambda m: _bytes(p for member in m.members() for p in member.parameters())  # noqa: E731
    stitch_bytes = lambda m: _bytes(m.stitch_parameters())  # noqa: E731
    assert member_bytes(bf16) * 2 == member_bytes(fp32)
    assert stitch_bytes(bf16) == stitch_bytes(fp32) > 0
    assert all(p.dtype == torch.float32 for p in bf16.stitch_parameters())
    # A training step on bf16 members: fp32 gradients for the stitches only.
    bf16.train()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    bf16(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bf16.stitch_parameters())
    assert all(p.grad is None for member in bf16.members() for p in member.parameters())
