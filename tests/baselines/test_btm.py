"""Invariants of the BTM ensemble: the mixture math, padding, the cached generation path, priors, save/load."""

import math

import pytest
import torch
from helpers import VOCAB, tiny_members, tiny_model
from transformers import AutoModelForCausalLM

from bts.baselines.btm import BTMEnsemble, sequence_logprob
from bts.errors import BTSError



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # scoped to each test: a module-level switch would leak into other test files
        yield


@pytest.fixture(scope="module")
def members():
    hub, experts = tiny_members(n=2, noise=0.5, num_hidden_layers=2)
    return [hub, *experts]


@pytest.fixture(scope="module")
def ensemble(members):
    return BTMEnsemble.from_members(members)


def ids_batch(batch=2, length=12, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def member_logp(model, ids):
    return torch.log_softmax(model(ids).logits.float(), -1)


def direct_mixture(members, ids, prior):
    """Probability-space reference: p(x_t+1 | x_≤t) = Σ_j p_j(·) P(j | x_≤t),
    with P(j | x_≤t) ∝ prior_j Π_u p_j(x_u | x_<u)."""
    probs = [member_logp(m, ids).double().exp() for m in members]  # [B, T, V] each
    batch, length = ids.shape
    out = torch.zeros(batch, length, probs[0].shape[-1], dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            likes = [prior[j] * math.prod(probs[j][b, u - 1, ids[b, u]].item() for u in range(1, t + 1))
                     for j in range(len(members))]
            z = sum(likes)
            out[b, t] = sum(likes[j] / z * probs[j][b, t] for j in range(len(members)))
    return out


def test_one_member_is_that_member(members):
    model = BTMEnsemble.from_members(members[:1])
    ids = ids_batch()
    torch.testing.assert_close(model(ids).logits, member_logp(members[0], ids), rtol=0, atol=1e-6)


def test_identical_members_equal_each_member():
    copies = [tiny_model(seed=3, num_hidden_layers=2) for _ in range(3)]
    ids = ids_batch()
    torch.testing.assert_close(BTMEnsemble.from_members(copies)(ids).logits, member_logp(copies[0], ids),
                               rtol=0, atol=1e-5)


def test_output_is_normalised_log_probs(ensemble):
    logits = ensemble(ids_batch()).logits
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(logits.shape[:2]), rtol=0, atol=1e-5)


def test_posterior_at_position_zero_is_the_prior(members):
    for prior in (None, [0.5, 0.3, 0.2]):
        model = BTMEnsemble.from_members(members)
        if prior is not None:  # a non-uniform prior, as fit_prior would set it
            model.log_prior = torch.tensor(prior, dtype=torch.float64).log()
        post = model(ids_batch(), return_posterior=True)["posterior"]
        torch.testing.assert_close(post[:, 0], model.prior.float().expand(2, 3), rtol=0, atol=1e-6)
        torch.testing.assert_close(post.sum(-1), torch.ones(post.shape[:2]), rtol=0, atol=1e-5)


def test_posterior_math_matches_direct_computation(members):
    two = members[:2]
    model = BTMEnsemble.from_members(two)
    prior = [0.7, 0.3]
    model.log_prior = torch.tensor(prior, dtype=torch.float64).log()
    ids = ids_batch(batch=2, length=6, seed=1)
    torch.testing.assert_close(model(ids).logits.double().exp(), direct_mixture(two, ids, prior),
                               rtol=1e-4, atol=1e-6)


def test_sequence_probability_is_the_prior_weighted_average(ensemble, members):
    """Bayes' chain rule: Π_t Σ_j P(j|x_<t) p_j(x_t|x_<t) = Σ_j prior_j p_j(x). Hence the ensemble NLL is never worse
    than the best member's NLL + log m."""
    ids = ids_batch(batch=3, length=16, seed=2)
    mask = torch.ones_like(ids)
    ens = sequence_logprob(ensemble, ids, mask)  # the mixture's log-probs are its logits: the same scorer applies
    per_member = torch.stack([sequence_logprob(m, ids, mask) for m in members], -1)
    torch.testing.assert_close(ens, (per_member - math.log(len(members))).logsumexp(-1), rtol=1e-6, atol=1e-4)
    assert (-ens <= -per_member.max(-1).values + math.log(len(members)) + 1e-4).all()


def test_loss_is_ensemble_nll(ensemble):
    ids = ids_batch(batch=2, length=10, seed=3)
    out = ensemble(ids, labels=ids)
    manual = -out.logits[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(out.loss, manual, rtol=1e-5, atol=1e-6)


def test_left_padding_matches_unpadded(ensemble):
    a, b = ids_batch(1, 9, seed=4)[0], ids_batch(1, 5, seed=5)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    out = ensemble(ids, attention_mask=mask, return_posterior=True)
    torch.testing.assert_close(out.logits[0], ensemble(a[None]).logits[0], rtol=0, atol=1e-5)
    single = ensemble(b[None], return_posterior=True)
    torch.testing.assert_close(out.logits[1, 4:], single.logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["posterior"][1, 4:], single["posterior"][0], rtol=0, atol=1e-5)


def test_greedy_generate_cache_equals_no_cache_equals_hand_loop(ensemble):
    ids = ids_batch(2, 7, seed=6)
    ids[1, :2] = 0
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    new = 8
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    cached = ensemble.generate(ids, use_cache=True, **kw)
    uncached = ensemble.generate(ids, use_cache=False, **kw)
    seq, m = ids, mask
    for _ in range(new):
        nxt = ensemble(seq, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, seq)


def test_cached_steps_match_full_forward(ensemble):
    """The posterior state carried by the cache reproduces the full-sequence posterior at every step."""
    ids = ids_batch(2, 10, seed=7)
    full = ensemble(ids, return_posterior=True)
    out = ensemble(ids[:, :6], use_cache=True, return_posterior=True)
    cache, steps, posts = out["cache"], [out.logits], [out["posterior"]]
    for t in range(6, 10):
        out = ensemble(ids[:, t:t + 1], attention_mask=torch.ones(2, t + 1, dtype=torch.long), cache=cache,
                       use_cache=True, return_posterior=True)
        cache = out["cache"]
        steps.append(out.logits)
        posts.append(out["posterior"])
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(posts, 1), full["posterior"], rtol=0, atol=1e-5)


def test_beam_search_runs(ensemble):
    out = ensemble.generate(ids_batch(2, 5, seed=8), max_new_tokens=4, num_beams=3, do_sample=False)
    assert out.shape == (2, 9)


def test_top_k_one_follows_the_map_member(members):
    model = BTMEnsemble.from_members(members, top_k=1)
    ids = ids_batch(2, 10, seed=9)
    post = BTMEnsemble.from_members(members)(ids, return_posterior=True)["posterior"]
    out = model(ids, return_posterior=True)
    assert ((out["posterior"] == 0) | (out["posterior"] == 1)).all()
    chosen = post.argmax(-1)  # [B, T]
    logps = torch.stack([member_logp(m, ids) for m in members], 2)
    expected = logps.gather(2, chosen[..., None, None].expand(-1, -1, 1, logps.shape[-1])).squeeze(2)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5)


def test_top_k_equal_to_m_is_the_full_mixture(members):
    ids = ids_batch(seed=10)
    torch.testing.assert_close(BTMEnsemble.from_members(members, top_k=3)(ids).logits,
                               BTMEnsemble.from_members(members)(ids).logits, rtol=0, atol=0)


def test_cached_prior_favours_the_member_that_fits_the_dev_data(members):
    # Dev data sampled greedily from expert 2 is far more likely under expert 2 than under the others.
    prompts = ids_batch(4, 3, seed=11)
    dev = members[2].generate(prompts, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    model = BTMEnsemble.from_members(members, prior="cached", dev_sequences=[{"input_ids": dev}])
    assert model.config.prior_type == "cached"
    assert model.prior.argmax().item() == 2
    torch.testing.assert_close(model.prior.sum().item(), 1.0)
    with pytest.raises(BTSError, match="dev_sequences"):
        BTMEnsemble.from_members(members, prior="cached")


def test_fit_prior_decay_weights_recent_sequences_more(members):
    model = BTMEnsemble.from_members(members)
    seqs = [members[j].generate(ids_batch(1, 3, seed=12 + j), max_new_tokens=20, min_new_tokens=20,
                                do_sample=False)[0] for j in (1, 2)]
    posts = [torch.softmax(torch.stack([sequence_logprob(m, s[None], torch.ones(1, len(s)))[0] for m in members]), 0)
             for s in seqs]
    prior = model.fit_prior(seqs, decay=0.3)
    expected = 0.3 * posts[0] + posts[1]
    torch.testing.assert_close(prior, expected / expected.sum(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_cached_generation_other_architectures(arch):
    hub, experts = tiny_members(arch, n=1, noise=0.5, num_hidden_layers=2)
    model = BTMEnsemble.from_members([hub, *experts])
    ids = ids_batch(2, 6, seed=14)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_fitted_prior_survives_a_member_ruled_out(tmp_path, members):
    model = BTMEnsemble.from_members(members)
    dev = members[1].generate(ids_batch(2, 3, seed=15), max_new_tokens=60, min_new_tokens=60, do_sample=False)
    prior = model.fit_prior([dev])
    assert (prior > 0).all()
    model.save_pretrained(tmp_path / "btm")
    torch.testing.assert_close(BTMEnsemble.from_pretrained(tmp_path / "btm").prior, model.prior)


def test_members_frozen_and_param_counts(ensemble, members):
    assert not any(p.requires_grad for p in ensemble.parameters())
    counts = ensemble.param_counts()
    total = sum(p.numel() for m in members for p in m.parameters())
    assert counts == {"total": total, "active": total, "trainable": 0}


def test_save_and_load_round_trip(tmp_path, members):
    import bts.baselines.btm  # noqa: F401  (registers bts_btm with the Auto classes)

    model = BTMEnsemble.from_members(members, top_k=2)
    model.log_prior = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64).log()
    model.save_pretrained(tmp_path / "btm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "btm")
    assert isinstance(loaded, BTMEnsemble)
    assert loaded.config.top_k == 2
    ids = ids_batch(seed=13)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_save_refuses_changed_member(tmp_path, members):
    for i, m in enumerate(members[:2]):
        m.save_pretrained(tmp_path / f"m{i}")
    model = BTMEnsemble.from_members([str(tmp_path / "m0"), str(tmp_path / "m1")])
    model.save_pretrained(tmp_path / "btm")
    tiny_model(seed=9, num_hidden_layers=2).save_pretrained(tmp_path / "m1")
    with pytest.raises(BTSError, match="changed"):
        BTMEnsemble.from_pretrained(tmp_path / "btm")


def test_bad_inputs(members):
    with pytest.raises(BTSError, match="members"):
        BTMEnsemble.from_members([])
    with pytest.raises(BTSError, match="vocab_size"):
        BTMEnsemble.from_members([members[0], tiny_model(vocab_size=VOCAB + 3, num_hidden_layers=2)])
    for k in (0, 4, -1):
        with pytest.raises(BTSError, match="top_k"):
            BTMEnsemble.from_members(members, top_k=k)
    with pytest.raises(BTSError, match="prior"):
        BTMEnsemble.from_members(members, prior="learned")
    with pytest.raises(BTSError, match="names"):
        BTMEnsemble.from_members(members, names=["a"])
