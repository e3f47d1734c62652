"""Adding and removing experts (bts.core.surgery): adding changes nothing until trained, yet trains; removing
renormalises the gates and is usable at once; both survive save/load; bad requests are BTSErrors."""

from __future__ import annotations

import pytest
import torch
from helpers import open_stitches, random_ids, save_members, tiny_members

import bts  # noqa: F401
from bts import BTSError, BTSForCausalLM
from bts.core.stitch import E2H
from bts.core.surgery import add_expert, new_slot_masks, remove_expert


def _trained(n=3, init="blend", **kw):
    hub, experts = tiny_members("llama", n)
    names = [f"e{i}" for i in range(n)]
    return open_stitches(BTSForCausalLM.from_members(hub, experts, names=names, init=init, **kw).eval()), experts


# ---- add ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["blend", "bias", "default"])
def test_add_expert_keeps_outputs_and_has_live_gradients(init):
    model, experts = _trained(3, init=init)
    small = remove_expert(model, "e2")  # a 2-expert model; e2 comes back as the new one
    ids = random_ids()
    with torch.no_grad():
        ref = small(ids).logits
    grown = add_expert(small, experts[2], name="new")
    assert grown.config.expert_names == ["e0", "e1", "new"]
    with torch.no_grad():
        assert (grown(ids).logits - ref).abs().max() <= 1e-4
    grown.train()
    grown(ids, labels=ids).loss.backward()
    e2h = [s for s in grown.stitches if s.kind == E2H]
    assert all(s.presence.grad[3].abs().sum() > 0 for s in e2h)  # the new member's presence is trainable now


def test_added_model_round_trips_through_save(tmp_path):
    hub_dir, expert_dirs = save_members(tmp_path, n=3)
    model = open_stitches(BTSForCausalLM.from_members(hub_dir, expert_dirs[:2]))
    grown = add_expert(model, expert_dirs[2], name="third")
    with torch.no_grad():
        for s in grown.stitches:
            if s.presence is not None:
                s.presence[3].fill_(0.5)  # as if trained
    grown.save_pretrained(tmp_path / "grown")
    loaded = BTSForCausalLM.from_pretrained(tmp_path / "grown")
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, grown.eval()(ids).logits)


# ---- remove -------------------------------------------------------------------------------------------------------
def test_remove_expert_renormalises_and_is_usable():
    model, _ = _trained(3)
    reduced = remove_expert(model, "e1")
    assert reduced.config.expert_names == ["e0", "e2"] and reduced.config.num_experts == 2
    ids = random_ids()
    for g, kind in zip(reduced.gate_values(ids, effective=True), reduced.config.stitch_kinds):
        assert g.shape[-2] == 3
        if kind == E2H:
            assert (g.sum(-2) - 1).abs().max() <= 1e-5
    # the kept slots are the old ones: the reduced model is the full one with e1 switched off
    model.set_active_experts(["e0", "e2"])
    with torch.no_grad():
        assert (reduced(ids).logits - model(ids).logits).abs().max() <= 1e-5
    out_c = reduced.generate(ids[:1], max_new_tokens=6, do_sample=False)
    out_n = reduced.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out_c, out_n)
    # removing leaves the source model working: it still has its three experts
    model.set_active_experts(None)
    assert model(ids).logits.isfinite().all()


def test_new_slot_masks_mark_one_expert_in_every_stitch_parameter_with_a_member_axis():
    model, _ = _trained(2)
    masks = new_slot_masks(model, "e1")
    assert masks and all(k.startswith("stitches.") for k in masks)
    params = dict(model.named_parameters())
    for key, mask in masks.items():
        assert mask.shape == params[key].shape and 0 < mask.sum() < mask.numel()


def test_bad_surgery_is_a_bts_error():
    model, experts = _trained(2)
    with pytest.raises(BTSError, match="'nope'"):
        remove_expert(model, "nope")
    with pytest.raises(BTSError, match="already a member"):
        add_expert(model, experts[0], name="e1")
    with pytest.raises(BTSError, match="only expert"):
        remove_expert(remove_expert(model, "e0"), "e1")
