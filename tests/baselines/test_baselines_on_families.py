"""BTM, sequence routing and the weight merges on every family bts supports (helpers.FAMILIES), and members that
stay themselves: wrapping a member in a BTM ensemble or a routed model, and running either, leaves the member's own
outputs and greedy generate() bit for bit as they were; one model object can serve two composites."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, VOCAB, tiny_members

from bts.baselines.btm import BTMEnsemble
from bts.baselines.merges import METHODS, merge_models, merge_state_dicts
from bts.baselines.routing import RoutedModel

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def members(request):
    hub, experts = tiny_members(request.param, 2, noise=0.5)
    return [hub, *experts]


def logp(model, ids=IDS):
    return torch.log_softmax(model(input_ids=ids).logits.float(), -1)


def snapshot(model):
    """What the member does on its own: its logits, its greedy continuation (cached), its state."""
    return (model(input_ids=IDS).logits.clone(), model.generate(IDS, **GEN),
            {k: v.clone() for k, v in model.state_dict().items()},
            [getattr(layer.self_attn, "layer_idx", None) for layer in model.model.layers], model.training)


def assert_unchanged(model, before):
    after = snapshot(model)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert all(torch.equal(after[2][k], v) for k, v in before[2].items())
    assert after[3] == before[3] and after[4] == before[4]


# ---- BTM ------------------------------------------------------------------------------------------------------------
def test_btm_of_identical_members_is_the_member(members):
    hub = members[0]
    model = BTMEnsemble.from_members([hub, hub, hub])  # one model object, three members
    torch.testing.assert_close(model(input_ids=IDS).logits, logp(hub), rtol=0, atol=1e-5)
    assert torch.equal(model.generate(IDS, **GEN), hub.generate(IDS, **GEN))


def test_btm_generate_with_cache_equals_without(members):
    model = BTMEnsemble.from_members(members)
    assert torch.equal(model.generate(IDS, use_cache=True, **GEN), model.generate(IDS, use_cache=False, **GEN))


def test_btm_keeps_members_themselves(members):
    before = [snapshot(m) for m in members]
    first = BTMEnsemble.from_members(members)
    second = BTMEnsemble.from_members([members[1], members[0]])  # the same objects serve a second ensemble
    first.generate(IDS, **GEN)
    second.generate(IDS, **GEN)
    out = first.generate(IDS, **GEN)
    for m, b in zip(members, before):
        assert_unchanged(m, b)
    assert torch.equal(first.generate(IDS, **GEN), out)


# ---- routing --------------------------------------------------------------------------------------------------------
def test_routing_with_a_fixed_choice_is_that_member(members):
    model = RoutedModel.from_members(members)
    for j, member in enumerate(members):
        choice = torch.full((IDS.shape[0],), j)
        got = model(input_ids=IDS, choice=choice).logits
        assert torch.equal(got, member(input_ids=IDS).logits.float()), j


def test_routed_generate_is_the_chosen_members_and_keeps_members_themselves(members):
    before = [snapshot(m) for m in members]
    model = RoutedModel.from_members(members)
    other = RoutedModel.from_members([members[2], members[0]])  # shared member objects
    chosen = model.choose(IDS)
    out = model.generate(IDS, **GEN)
    for row, j in enumerate(chosen.tolist()):
        alone = members[j].generate(IDS[row:row + 1], **GEN)
        assert torch.equal(out[row, : alone.shape[1]], alone[0])
    other.generate(IDS, **GEN)
    for m, b in zip(members, before):
        assert_unchanged(m, b)


def test_routed_generate_with_cache_equals_without(members):
    model = RoutedModel.from_members(members)
    assert torch.equal(model.generate(IDS, use_cache=True, **GEN), model.generate(IDS, use_cache=False, **GEN))


# ---- merges ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_merging_identical_members_returns_the_member(members, method):
    hub = members[0]
    sd = hub.state_dict()
    out = merge_state_dicts(sd, [sd, sd], method)
    assert out.keys() == sd.keys()
    for k, v in sd.items():
        torch.testing.assert_close(out[k], v, rtol=0, atol=1e-7 if method == "soup" else 0.0)


def test_merged_models_have_the_members_shapes_and_run(members):
    hub, experts = members[0], members[1:]
    shapes = {k: v.shape for k, v in hub.state_dict().items()}
    soup = merge_models(hub, experts, "soup")
    ta = merge_models(hub, experts[:1], "task_arithmetic")
    ties = merge_models(hub, experts, "ties")
    for model in (soup, ta, ties):
        assert type(model) is type(hub) and {k: v.shape for k, v in model.state_dict().items()} == shapes
        assert torch.isfinite(model(input_ids=IDS).logits).all()
    # λ = 1 with one expert: seed + (expert - seed), the expert up to one rounding step
    torch.testing.assert_close(logp(ta), logp(experts[0]), rtol=0, atol=1e-4)
    mean = {k: (v.float() + sum(e.state_dict()[k].float() for e in experts)) / 3 for k, v in hub.state_dict().items()}
    for k, v in soup.state_dict().items():
        torch.testing.assert_close(v, mean[k].to(v.dtype), rtol=0, atol=1e-6)
