"""BTM ensemble (Branch-Train-Merge, arXiv 2208.03306): every member runs on every token and their next-token
distributions are mixed by a Bayesian posterior over members.

    p(x_t | x_<t) = Σ_j p_j(x_t | x_<t) · P(j | x_<t),      P(j | x_<t) ∝ p_j(x_<t) · prior_j

    model = BTMEnsemble.from_members(["seed/", "code/", "math/"])          # uniform prior (as BTS used)
    model.fit_prior(dev_sequences)                                          # optional "cached" prior
    model.save_pretrained("btm/")                                           # a config + a manifest of members
    model = AutoModelForCausalLM.from_pretrained("btm/")                    # after `import bts.baselines.btm`

`forward` returns the mixture's LOG-probabilities as `logits`, so cross-entropy on them is the ensemble NLL and
argmax / `generate()` work unchanged. Everything is in log space: s_j = Σ log p_j(x_u | x_<u) over the scored prefix,
log P(j | x_<t) = log_softmax_j(s_j + log prior_j), log p = logsumexp_j(log P(j | x_<t) + log p_j). The first
token of a sequence has no prediction, so at position 0 the posterior is the prior.

Generation keeps one ordinary `DynamicCache` per member inside an `EnsembleCache`, together with the running s_j
and each member's last next-token log-probs (needed to score the token that arrives next). A cached decoding step
therefore costs m member steps, like the ensemble itself; nothing is recomputed from the start. Memory: the forward
holds all m members' log-probs, m·B·T·V floats.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Cache, DynamicCache

from bts.baselines.base import Baseline, accounting, run_members
from bts.baselines.composite import (CompositeModel, MemberSetConfig, as_batch, positions_from_mask,
                                     token_logprobs)
from bts.core import hf
from bts.core.members import load_member_set
from bts.errors import BTSError

CACHED_PRIOR_DECAY = 0.3  # BTM's "cached prior" decay; the third-party value, unverified against the paper


# ---- config ---------------------------------------------------------------------------------------------------------
@strict
class BTMConfig(MemberSetConfig):
    model_type = "bts_btm"

    prior: list | None = None  # probabilities, one per member; None = uniform
    prior_type: str = "uniform"  # "uniform" or "cached" (fitted by fit_prior)
    top_k: int | None = None  # mix only the k members with the highest posterior (renormalised)

    def cache_copies(self) -> int:
        return self.num_members  # every member runs on every sequence


def _check_options(num_members: int, prior, prior_type: str, top_k) -> None:
    if prior_type not in ("uniform", "cached"):
        raise BTSError(f"prior must be 'uniform' or 'cached' (got '{prior_type}').")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_members):
        raise BTSError(f"top_k must be an integer between 1 and the {num_members} members (got {top_k}).")
    if prior is not None:
        if len(prior) != num_members or any(not (p > 0 and math.isfinite(p)) for p in prior):
            raise BTSError(f"prior must hold {num_members} positive probabilities (got {list(prior)}).")


# ---- cache ----------------------------------------------------------------------------------------------------------
class EnsembleCache(Cache):
    """One `DynamicCache` per member plus the posterior state. Its `layers` are the members' layers, so generate's
    bookkeeping (get_seq_length, beam reordering, batch expansion) acts on every member at once."""

    def __init__(self, member_configs):
        self.members = [DynamicCache(config=c) for c in member_configs]
        super().__init__(layers=[layer for cache in self.members for layer in cache.layers])
        self.prefix_logp = None  # [B, m] float64: s_j of everything seen so far
        self.next_logp = None  # [B, m, V]: each member's log-probs for the token after the last one seen

    def _state(self, fn) -> None:
        if self.prefix_logp is not None:
            self.prefix_logp, self.next_logp = fn(self.prefix_logp), fn(self.next_logp)

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._state(lambda t: t[indices])

    def reset(self):
        super().reset()
        self.prefix_logp = self.next_logp = None

    @property
    def is_croppable(self) -> bool:
        return False  # the posterior state has no history to roll back to (assisted decoding is refused)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("EnsembleCache cannot be cropped: the BTM posterior state is not rewindable.")


# ---- model ----------------------------------------------------------------------------------------------------------
class BTMEnsemble(CompositeModel):
    config_class = BTMConfig
    base_model_prefix = "btm"
    _supports_attention_backend = True
    kind = "BTM ensemble"

    def __init__(self, config: BTMConfig, members: list[nn.Module] | None = None):
        super().__init__(config)
        m = config.num_members
        _check_options(m, config.prior, config.prior_type, config.top_k)
        prior = torch.tensor(config.prior, dtype=torch.float64) if config.prior else torch.ones(m, dtype=torch.float64)
        self.register_buffer("log_prior", (prior / prior.sum()).log(), persistent=False)
        self.attach_members(members)

    @classmethod
    def from_members(cls, members, *, names: list[str] | None = None, prior: str = "uniform",
                     top_k: int | None = None, dev_sequences=None, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> "BTMEnsemble":
        """An ensemble of the seed and its experts (seed first): dirs, cached hub ids or loaded models, read onto
        `device` in `dtype`. prior="cached" fits the prior on `dev_sequences` (see fit_prior); "uniform" is what
        BTS used."""
        loaded = load_member_set(members, names, dtype, device=device)
        _check_options(len(loaded), None, prior, top_k)
        if prior == "cached" and dev_sequences is None:
            raise BTSError("prior='cached' needs dev_sequences to estimate it from (got none).")
        model = cls(cls.config_for(loaded, prior_type=prior, top_k=top_k), members=[m.model for m in loaded])
        if device is not None:
            model.to(device)
        if prior == "cached":
            model.fit_prior(dev_sequences)
        return model

    def _init_weights(self, module):
        pass  # nothing of the ensemble's own is trainable

    @property
    def prior(self) -> torch.Tensor:
        return self.log_prior.exp()

    def param_counts(self) -> dict:
        """BTM runs every member on every token: total = active = Σ members; nothing trains."""
        total = sum(p.numel() for p in self.members.parameters())
        return {"total": total, "active": total, "trainable": sum(p.numel() for p in self.parameters()
                                                                   if p.requires_grad)}

    # ---- the mixture --------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None,
                logits_to_keep=0, return_posterior: bool = False, inputs_embeds=None, **kwargs):
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("BTMEnsemble needs input_ids: every member embeds the tokens with its own table.")
        cache = hf.cache_from_kwargs(kwargs)
        if cache is not None and not isinstance(cache, EnsembleCache):
            # generate() hands over an empty DynamicCache of its own; a filled one cannot hold the posterior state.
            if cache.get_seq_length() > 0:
                raise ValueError("BTMEnsemble needs an EnsembleCache (a non-empty plain cache was given).")
            cache = None
        if use_cache and cache is None:
            cache = EnsembleCache([member.config for member in self.members])
        past = cache.get_seq_length() if cache is not None else 0
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape[1] != past + length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions; expected {past + length}.")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, length)

        member_logp = []
        for j, member in enumerate(self.members):
            out = member(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=cache is not None, **{hf.CACHE_KWARG: cache.members[j] if cache else None})
            member_logp.append(torch.log_softmax(out.logits.float(), dim=-1))
        logp = torch.stack(member_logp, dim=2)  # [B, T, m, V]: log p_j(· | x_≤t)

        log_post, prefix = self._posterior(logp, input_ids, attention_mask.bool(), past, cache)
        if cache is not None:
            cache.prefix_logp, cache.next_logp = prefix, logp[:, -1]
        if logits_to_keep:
            logp, log_post = logp[:, -logits_to_keep:], log_post[:, -logits_to_keep:]
        mixture = torch.logsumexp(log_post.unsqueeze(-1) + logp, dim=2)  # [B, T, V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=mixture, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = hf.causal_lm_output(loss, mixture, cache)
        if return_posterior:
            out["posterior"] = log_post.exp()  # [B, T, m]: P(j | x_≤t), the weights of the prediction at t
        return out

    def _posterior(self, logp, input_ids, mask, past, cache):
        """log P(j | x_≤t) for each position t of this chunk, and s_j after the chunk."""
        batch, length, m, _ = logp.shape
        # Score of token t under member j: its prediction from position t-1 (from the cache for the chunk's first).
        scored = logp[:, :-1].gather(-1, input_ids[:, 1:, None, None].expand(batch, length - 1, m, 1)).squeeze(-1)
        if past:
            first = cache.next_logp.gather(-1, input_ids[:, :1, None].expand(batch, m, 1)).transpose(1, 2)
        else:
            first = logp.new_zeros(batch, 1, m)
        scored = torch.cat([first, scored], dim=1).double()  # [B, T, m]
        # Only a real token predicted from a real position counts, so left padding contributes nothing.
        prev_real = torch.cat([mask.new_zeros(batch, 1), mask[:, :-1]], dim=1)
        counts = (mask & prev_real)[:, past:]
        scored = torch.where(counts.unsqueeze(-1), scored, 0.0)
        start = cache.prefix_logp if past else scored.new_zeros(batch, m)
        s = start.unsqueeze(1) + scored.cumsum(dim=1)  # [B, T, m]: log p_j(x_≤t)
        weights = s + self.log_prior.to(s.device)
        k = self.config.top_k
        if k is not None and k < m:
            keep = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, weights.topk(k, dim=-1).indices, True)
            weights = weights.masked_fill(~keep, float("-inf"))
        return torch.log_softmax(weights, dim=-1).float(), s[:, -1]

    # ---- the cached prior ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_prior(self, sequences, decay: float = CACHED_PRIOR_DECAY, max_sequences: int = 100) -> torch.Tensor:
        """Estimate a "cached" prior from dev sequences: each sequence's posterior over members (under a uniform
        prior, whole sequence) is folded in with an exponential-decay update, acc ← decay·acc + posterior, and the
        prior is acc normalised. `sequences`: an iterable of 1-D token tensors / lists, [B, T] tensors, or dicts
        with input_ids (and attention_mask), e.g. a DataLoader. Our reading of BTM's cached prior [I]."""
        if not 0.0 <= decay < 1.0:
            raise BTSError(f"decay must be in [0, 1) (got {decay}).")
        device = self.log_prior.device
        acc, seen = None, 0
        for batch in sequences:
            if seen >= max_sequences:
                break
            ids, mask = as_batch(batch, device)
            ids, mask = ids[: max_sequences - seen], mask[: max_sequences - seen]
            s = torch.stack([sequence_logprob(member, ids, mask) for member in self.members], dim=-1)  # [B, m]
            for post in torch.softmax(s, dim=-1):  # uniform prior: the posterior is softmax(s)
                acc = post if acc is None else decay * acc + post
                seen += 1
        if acc is None:
            raise BTSError("fit_prior: no dev sequences were given.")
        prior = acc.clamp_min(1e-12)  # a member the dev data rules out keeps a sliver: log 0 would freeze it out
        prior = prior / prior.sum()
        self.log_prior = prior.log().to(self.log_prior.dtype)
        self.config.prior = prior.tolist()
        self.config.prior_type = "cached"
        return prior

    # ---- saving and loading: bts.baselines.composite; the prior goes into the config -------------------------------
    def _save_own(self, out, config: BTMConfig) -> None:
        config.prior = self.prior.tolist()


def sequence_logprob(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """log p(x) of each sequence under one causal LM (its first real token unscored), float64 [B]."""
    token_logp, counts = token_logprobs(model, input_ids, attention_mask)
    return torch.where(counts, token_logp, 0.0).sum(-1)


AutoConfig.register("bts_btm", BTMConfig)
AutoModelForCausalLM.register(BTMConfig, BTMEnsemble)


class BTMBaseline(Baseline):
    """`btm`: the ensemble of the seed and the experts under a uniform prior (as the BTS paper); no training."""

    def build(self, run) -> dict:
        from bts.train import distributed

        seed, experts = run_members(run)
        model = BTMEnsemble.from_members([seed, *experts], names=["seed", *run.recipe.expert_domains],
                                         dtype=run.members_dtype, device=run.device)
        if distributed.is_main():  # under torchrun every rank builds it; rank 0 writes it
            model.save_pretrained(run.model_dir(self.name))
        return {}

    def load(self, path, info: dict, device=None, dtype=None):
        model = BTMEnsemble.from_pretrained(path, dtype=dtype, device_map=device).eval()
        return model, accounting(model.param_counts())


BASELINES = (BTMBaseline("btm"),)
