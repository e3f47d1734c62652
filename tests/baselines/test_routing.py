"""Sequence-level routing: targets, the prefix features, learning to route by domain, the routed model."""

import pytest
import torch
from helpers import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from bts.baselines.routing import (RoutedModel, SequenceRouter, compute_routing_targets, mean_prefix_embedding,
                                   member_losses, router_loss, routing_loss_fn, sample_prefix_lengths, train_router)
from bts.errors import BTSError

DOMAINS = [(3, 33), (33, 63), (63, 93)]  # member k is trained on tokens drawn from DOMAINS[k]


def domain_batch(k, batch=8, length=40, seed=0):
    lo, hi = DOMAINS[k]
    return torch.randint(lo, hi, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def members():
    """Three copies of one tiny seed, each briefly trained on its own token range: member k is best on domain k."""
    out = []
    for k in range(len(DOMAINS)):
        model = tiny_model(seed=0, num_hidden_layers=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for step in range(8):  # enough for a clear margin: ~3.5 nats on its own range vs ~6.5 on the others
            ids = domain_batch(k, batch=4, length=32, seed=1000 * k + step)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(model.eval().requires_grad_(False))
    return out


def mixed_batches(count, seed):
    return [torch.cat([domain_batch(k, batch=4, length=48, seed=seed + 10 * i + k) for k in range(3)])
            for i in range(count)]


def row_loss(model, ids):
    return torch.stack([model(input_ids=r[None], labels=r[None]).loss for r in ids])


def test_members_are_domain_experts(members):
    for k in range(3):
        losses = member_losses(members, domain_batch(k, seed=77))
        assert (losses.argmin(-1) == k).all()


def test_targets_are_argmin_of_member_losses(members):
    with torch.no_grad():
        batches = [torch.randint(3, VOCAB, (5, 20), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        batches.append(domain_batch(2, batch=3, seed=3))
        expected = torch.cat([torch.stack([row_loss(m, b) for m in members], -1).argmin(-1) for b in batches])
    assert torch.equal(compute_routing_targets(members, batches), expected)


def test_member_losses_ignore_padding(members):
    ids = domain_batch(1, batch=1, length=12, seed=4)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    torch.testing.assert_close(member_losses(members, padded, mask), member_losses(members, ids), rtol=0, atol=1e-5)


def test_prefix_lengths_are_seeded_and_clipped():
    mask = torch.ones(64, 300, dtype=torch.long)
    mask[:32, 100:] = 0
    t1 = sample_prefix_lengths(mask, torch.Generator().manual_seed(5))
    t2 = sample_prefix_lengths(mask, torch.Generator().manual_seed(5))
    assert torch.equal(t1, t2)
    assert (t1[:32] <= 100).all() and (t1 >= 32).all() and (t1 <= 256).all()
    assert len(set(t1[32:].tolist())) > 10  # drawn, not fixed


def test_mean_prefix_embedding_uses_the_first_real_tokens():
    embed = torch.nn.Embedding(VOCAB, 8)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    feats = mean_prefix_embedding(embed, ids, mask, torch.tensor([2, 3]))
    with torch.no_grad():
        torch.testing.assert_close(feats[0], embed(torch.tensor([5, 6])).mean(0))
        torch.testing.assert_close(feats[1], embed(torch.tensor([9, 10, 11])).mean(0))
        whole = embed(torch.tensor([5, 6, 7, 8])).mean(0)
        torch.testing.assert_close(mean_prefix_embedding(embed, ids, mask)[0], whole)


def test_router_loss_trains_only_the_router(members):
    router = SequenceRouter(32, 3)
    ids = mixed_batches(1, seed=6)[0]
    loss = router_loss(router, members, ids, None, torch.Generator().manual_seed(0))
    loss.backward()
    assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for m in members for p in m.parameters())


def test_router_learns_to_pick_the_domain_expert(members):
    torch.manual_seed(0)
    router = SequenceRouter(32, 3)
    losses = train_router(router, members, mixed_batches(4, seed=100), steps=150, lr=2e-2, seed=0)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    model = RoutedModel.from_members(members, router=router)
    for k in range(3):
        held_out = domain_batch(k, batch=6, length=40, seed=999 + k)
        assert (model.choose(held_out) == k).all()


@pytest.fixture(scope="module")
def routed(members):
    model = RoutedModel.from_members(members)
    with torch.no_grad():  # a fixed router that sends domain k to member k: one weight per domain centroid
        emb = members[0].get_input_embeddings().weight
        centroids = torch.stack([emb[lo:hi].mean(0) for lo, hi in DOMAINS])
        model.router.proj.weight.copy_(50 * centroids)
        model.router.proj.bias.copy_(-25 * (centroids * centroids).sum(-1))
    return model


def test_routed_loss_is_the_chosen_members_loss(routed, members):
    ids = torch.cat([domain_batch(k, batch=2, length=20, seed=50 + k) for k in (2, 0, 1)])
    choice = routed.choose(ids)
    assert torch.equal(choice, torch.tensor([2, 2, 0, 0, 1, 1]))
    with torch.no_grad():
        out = routed(ids, labels=ids)
        for b in range(len(ids)):
            ref = members[choice[b]](input_ids=ids[b:b + 1], labels=ids[b:b + 1])
            torch.testing.assert_close(out.logits[b], ref.logits[0].float(), rtol=0, atol=1e-5)
        per_row = torch.stack([members[choice[b]](input_ids=ids[b:b + 1], labels=ids[b:b + 1]).loss
                               for b in range(len(ids))])
    torch.testing.assert_close(out.loss, per_row.mean(), rtol=1e-5, atol=1e-6)
    forced = routed(ids[:1], labels=ids[:1], choice=torch.tensor([1])).loss
    torch.testing.assert_close(forced, members[1](input_ids=ids[:1], labels=ids[:1]).loss)


def test_generate_uses_the_member_chosen_from_the_prompt(routed, members):
    prompts = torch.cat([domain_batch(k, batch=1, length=10, seed=60 + k) for k in (1, 2, 0)])
    out = routed.generate(prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for b, k in enumerate((1, 2, 0)):
        ref = members[k].generate(prompts[b:b + 1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(out[b], ref[0])


def test_param_counts(routed, members):
    counts = routed.param_counts()
    one = sum(p.numel() for p in members[0].parameters())
    assert counts["trainable"] == 32 * 3 + 3
    assert counts["total"] == 3 * one + counts["trainable"]
    assert counts["active"] == one + counts["trainable"]
    assert [n for n, p in routed.named_parameters() if p.requires_grad] == ["router.proj.weight", "router.proj.bias"]


def test_routing_loss_fn_for_the_shared_loop(routed):
    loss = routing_loss_fn(routed, {"input_ids": mixed_batches(1, seed=7)[0]})
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad


def test_save_and_load_round_trip(tmp_path, routed):
    routed.save_pretrained(tmp_path / "routed")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "routed")
    assert isinstance(loaded, RoutedModel)
    ids = torch.cat([domain_batch(k, batch=1, length=16, seed=70 + k) for k in range(3)])
    with torch.no_grad():
        assert torch.equal(loaded.choose(ids), routed.choose(ids))
        torch.testing.assert_close(loaded(ids).logits, routed(ids).logits, rtol=0, atol=0)


def test_bad_inputs(members):
    with pytest.raises(BTSError, match="members"):
        RoutedModel.from_members([])
    with pytest.raises(BTSError, match="members"):
        compute_routing_targets([], [torch.ones(1, 4, dtype=torch.long)])
    with pytest.raises(BTSError, match="vocab_size"):
        RoutedModel.from_members([members[0], tiny_model(vocab_size=VOCAB + 3, num_hidden_layers=2)])
    with pytest.raises(BTSError, match="router"):
        RoutedModel.from_members(members, router=SequenceRouter(32, 2))
    with pytest.raises(BTSError, match="steps"):
        train_router(SequenceRouter(32, 3), members, mixed_batches(1, seed=8), steps=0)
