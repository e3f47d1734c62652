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
import shutil
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, Cache, DynamicCache, GenerationMixin,
                          PreTrainedModel)

from bts.core import hf
from bts.core.config import CompositeConfig
from bts.errors import BTSError
from bts.core.members import Member, check_compatible, freeze, load_causal_lm, weights_sha256

CACHED_PRIOR_DECAY = 0.3  # BTM's "cached prior" decay; the third-party value, unverified against the paper


# ---- members shared by the ensemble-style baselines (also used by bts.baselines.routing) ---------------------------
def load_member_set(members, names: list[str] | None = None, dtype: torch.dtype | None = None) -> list[Member]:
    """Load and check the members (seed first, then experts): dirs, cached hub ids or loaded *ForCausalLM models."""
    members = list(members) if isinstance(members, (list, tuple)) else [members]
    if not members:
        raise BTSError("members: at least one member (the seed) is needed (got none).")
    if names is not None and len(names) != len(members):
        raise BTSError(f"names: {len(names)} names given for {len(members)} members.")
    loaded = []
    for i, spec in enumerate(members):
        role = "seed" if i == 0 else f"expert {i}"
        model, path = load_causal_lm(spec, role, dtype)
        default = "seed" if i == 0 else (Path(str(spec)).name if not isinstance(spec, nn.Module) else f"expert{i}")
        loaded.append(Member(names[i] if names else default, model, path))
    if len(loaded) > 1:
        check_compatible(loaded[0], loaded[1:])
    return loaded


def member_manifest(members: list[Member]) -> list[dict]:
    return [{"name": m.name, "path": m.path, "sha256": weights_sha256(m.path) if m.path else None} for m in members]


def save_member_manifest(manifest: list[dict], models: list[nn.Module], out: Path, export_members: bool) -> list:
    """The manifest to write into `out`: members that only exist in memory (or all, with export_members) are
    written under out/members/<name> and referenced relatively, so the folder is self-contained."""
    written = []
    for spec, model in zip(manifest, models):
        spec = dict(spec)
        if export_members or not spec["path"]:
            target = out / "members" / spec["name"]
            if spec["path"] and Path(spec["path"]).resolve() != target.resolve():
                shutil.copytree(spec["path"], target, dirs_exist_ok=True)
            elif not spec["path"]:
                model.save_pretrained(target)
            spec["path"] = f"members/{spec['name']}"
            spec["sha256"] = weights_sha256(target)
        written.append(spec)
    return written


def reload_members(manifest: list[dict], folder: Path, dtype=None) -> list[nn.Module]:
    """Load the members a saved wrapper refers to, refusing any whose weights changed since it was saved."""
    models = []
    for spec in manifest:
        path = Path(spec["path"])
        path = path if path.is_absolute() else folder / path
        if not path.is_dir():
            raise BTSError(f"member '{spec['name']}' was saved from '{path}', which no longer exists.")
        found = weights_sha256(path)
        if spec.get("sha256") and found != spec["sha256"]:
            raise BTSError(f"member '{spec['name']}' at '{path}' has changed since the model was saved "
                           f"(weights sha256 {found[:12]}… != recorded {spec['sha256'][:12]}…).")
        models.append(load_causal_lm(str(path), f"member '{spec['name']}'", dtype)[0])
    return models


def positions_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids that ignore left padding (as generate derives them), for the last `length` positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


# ---- config ---------------------------------------------------------------------------------------------------------
@strict
class BTMConfig(CompositeConfig):
    model_type = "bts_btm"

    prior: list | None = None  # probabilities, one per member; None = uniform
    prior_type: str = "uniform"  # "uniform" or "cached" (fitted by fit_prior)
    top_k: int | None = None  # mix only the k members with the highest posterior (renormalised)
    num_members: int = 1

    def fill_defaults(self) -> None:
        if self.members is not None:
            self.num_members = len(self.members)

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
class BTMEnsemble(PreTrainedModel, GenerationMixin):
    config_class = BTMConfig
    base_model_prefix = "btm"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: BTMConfig, members: list[nn.Module] | None = None):
        super().__init__(config)
        self.loss_type = "ForCausalLM"  # HF derives it from the class name, which lacks 'ForCausalLM'
        m = config.num_members
        _check_options(m, config.prior, config.prior_type, config.top_k)
        prior = torch.tensor(config.prior, dtype=torch.float64) if config.prior else torch.ones(m, dtype=torch.float64)
        self.register_buffer("log_prior", (prior / prior.sum()).log(), persistent=False)
        self.post_init()  # before the members are attached: HF's weight init must never touch loaded members
        if members is None:  # from a config alone (tests, planning): random members
            members = [AutoModelForCausalLM.from_config(config.base_config) for _ in range(m)]
        if len(members) != m:
            raise BTSError(f"members: {len(members)} models given but the config lists {m}.")
        self.members = nn.ModuleList(freeze(member) for member in members)

    @classmethod
    def from_members(cls, members, *, names: list[str] | None = None, prior: str = "uniform",
                     top_k: int | None = None, dev_sequences=None, dtype: torch.dtype | None = None) -> "BTMEnsemble":
        """An ensemble of the seed and its experts (seed first): dirs, cached hub ids or loaded models.
        prior="cached" fits the prior on `dev_sequences` (see fit_prior); "uniform" is what BTS used."""
        loaded = load_member_set(members, names, dtype)
        _check_options(len(loaded), None, prior, top_k)
        if prior == "cached" and dev_sequences is None:
            raise BTSError("prior='cached' needs dev_sequences to estimate it from (got none).")
        base = loaded[0].model.config
        config = BTMConfig(base_config=base.to_dict(), members=member_manifest(loaded), prior_type=prior,
                           top_k=top_k, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                           pad_token_id=base.pad_token_id)
        config._attn_implementation = base._attn_implementation
        model = cls(config, members=[m.model for m in loaded])
        if prior == "cached":
            model.fit_prior(dev_sequences)
        return model

    def _init_weights(self, module):
        pass  # nothing of the ensemble's own is trainable

    def train(self, mode: bool = True):
        super().train(mode)
        for member in self.members:
            member.eval()  # frozen members never run dropout
        return self

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

    # ---- saving and loading -------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, export_members: bool = False, **_ignored):
        """Write the config (prior, top_k) and a manifest of the members (path + weights hash); members that only
        exist in memory, or all with export_members=True, are copied into the folder."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        config = self.config.__class__.from_dict(self.config.to_dict())
        config.members = save_member_manifest(self.config.members, list(self.members), out, export_members)
        config.prior = self.prior.tolist()
        config.architectures = [type(self).__name__]
        config.save_pretrained(out)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(out)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, **kwargs):
        folder = Path(pretrained_model_name_or_path)
        if not (folder / "config.json").exists():
            raise BTSError(f"'{folder}' is not a saved BTM ensemble (no config.json).")
        config = config if isinstance(config, BTMConfig) else BTMConfig.from_pretrained(folder)
        models = reload_members(config.members, folder, dtype)
        config._attn_implementation = models[0].config._attn_implementation
        model = cls(config, members=models)
        if (folder / "generation_config.json").exists():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder)
        return model.eval()


def as_batch(batch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], attention_mask [B, T]) from a dict, a tensor or a token list."""
    if isinstance(batch, dict):
        ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
    else:
        ids, mask = torch.as_tensor(batch), None
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    return ids.to(device), mask.to(device)


def sequence_logprob(model: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """log p(x) of each sequence under one causal LM (its first real token unscored), float64 [B]."""
    token_logp, counts = token_logprobs(model, input_ids, attention_mask)
    return torch.where(counts, token_logp, 0.0).sum(-1)


def token_logprobs(model: nn.Module, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_t | x_<t) for t ≥ 1 ([B, T-1], float64) and which of them are real tokens with a real context."""
    mask = attention_mask.bool()
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=positions_from_mask(attention_mask, input_ids.shape[1])).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp.double(), mask[:, 1:] & mask[:, :-1]


AutoConfig.register("bts_btm", BTMConfig)
AutoModelForCausalLM.register(BTMConfig, BTMEnsemble)
