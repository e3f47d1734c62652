"""Sequence-level expert routing (BTS paper §4 baselines): a linear router picks ONE member, the seed or an expert, for the
whole sequence, from the mean input embedding (the seed's table) of its first tokens.

    router = SequenceRouter(hidden_size=d, num_members=m)            # d·m + m trainable parameters
    train_router(router, members, batches, steps=200)                # constant lr 5e-4, seeded t ~ U[32, 256]
    model = RoutedModel.from_members(members, router=router)
    model(input_ids, labels=input_ids).loss                          # each row: the chosen member's loss
    model.generate(prompt_ids, max_new_tokens=32)                    # member chosen from the prompt, then alone

Training target: the member with the lowest next-token loss on the (whole) sequence. Router input: during
training the mean embedding of the first t real tokens, t ~ U[32, 256] clipped to the sequence length; at
inference the mean embedding of the whole prompt. `router_loss` is the per-batch loss; it plugs into the shared
loop as `loss_fn=routing_loss_fn` (bts.train.loop; set warmup=0 and min_lr_ratio=1 there for the paper's constant lr).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from bts.atomic import atomic_save_safetensors
from bts.baselines.base import Baseline, accounting, positive, run_members, train_on_stitch_mix
from bts.baselines.composite import (CompositeModel, MemberSetConfig, as_batch, positions_from_mask,
                                     token_logprobs)
from bts.core.members import load_member_set
from bts.errors import BTSError

ROUTER_WEIGHTS = "router.safetensors"
PREFIX_RANGE = (32, 256)  # t ~ U[32, 256] during training [R]
ROUTE_PREFIX = 32  # tokens the `routing` baseline routes on when scoring: the "prompt" of each window


class SequenceRouter(nn.Module):
    """Linear scores over members from a mean token embedding: [B, d] → [B, m]."""

    def __init__(self, hidden_size: int, num_members: int):
        super().__init__()
        if num_members < 1:
            raise BTSError(f"num_members must be at least 1 (got {num_members}).")
        self.proj = nn.Linear(hidden_size, num_members)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.to(self.proj.weight.dtype))


def mean_prefix_embedding(embed: nn.Module, input_ids, attention_mask=None, lengths=None) -> torch.Tensor:
    """Mean embedding of each sequence's first `lengths[b]` real tokens (all of them if lengths is None); padding,
    left or right, is skipped. float32 [B, d]."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if lengths is not None:
        mask = mask & (mask.long().cumsum(-1) <= lengths.to(mask.device).unsqueeze(-1))
    with torch.no_grad():  # the seed's table is frozen; only the router trains
        emb = embed(input_ids).float()
    weights = mask.unsqueeze(-1).float()
    return (emb * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def sample_prefix_lengths(attention_mask, generator: torch.Generator | None = None,
                          low: int = PREFIX_RANGE[0], high: int = PREFIX_RANGE[1]) -> torch.Tensor:
    """t ~ U[low, high] per sequence (inclusive), clipped to the sequence's real length. Under torchrun each rank
    draws the lengths of the whole global batch and keeps its own rows, so the draws equal a 1-process run's."""
    from bts.train import distributed

    rows, rank, world = attention_mask.shape[0], distributed.rank(), distributed.world()
    t = torch.randint(low, high + 1, (rows * world,), generator=generator)[rank * rows:(rank + 1) * rows]
    return torch.minimum(t.to(attention_mask.device), attention_mask.long().sum(-1))


# ---- targets ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def member_losses(members, input_ids, attention_mask=None) -> torch.Tensor:
    """Mean next-token NLL of every sequence under every member, [B, m] (0 for a sequence with no scored token)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    losses = []
    for member in members:
        logp, counts = token_logprobs(member, input_ids, attention_mask)
        losses.append(-torch.where(counts, logp, 0.0).sum(-1) / counts.sum(-1).clamp_min(1))
    return torch.stack(losses, dim=-1)


@torch.no_grad()
def compute_routing_targets(members, batches) -> torch.Tensor:
    """The best member (lowest next-token loss) of every sequence, batches concatenated in order: LongTensor [N].
    batches: dicts with input_ids (+ attention_mask), [B, T] tensors or token lists. Ties go to the lower index
    (the seed first)."""
    members = _check_members(members)
    device = next(members[0].parameters()).device
    targets = [member_losses(members, *as_batch(batch, device)).argmin(-1) for batch in batches]
    if not targets:
        raise BTSError("batches: no sequences were given to compute routing targets on.")
    return torch.cat(targets)


def router_loss(router: SequenceRouter, members, input_ids, attention_mask=None,
                generator: torch.Generator | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the router, fed the mean embedding of a random prefix (t ~ U[32, 256]), against the member
    with the lowest loss on the whole sequence (computed here unless `targets` is given)."""
    members = _check_members(members)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if targets is None:
        targets = member_losses(members, input_ids, attention_mask).argmin(-1)
    lengths = sample_prefix_lengths(attention_mask, generator)
    features = mean_prefix_embedding(members[0].get_input_embeddings(), input_ids, attention_mask, lengths)
    return F.cross_entropy(router(features).float(), targets.to(features.device))


def routing_loss_fn(model: "RoutedModel", batch: dict) -> torch.Tensor:
    """`loss_fn` for bts.train.train: the prefix lengths come from the global RNG, which that loop seeds and
    checkpoints, so a resumed run draws the same t. It goes through model.forward (return_router_loss=True), so FSDP2's
    hooks on the root module gather the router and the members' shared weights first."""
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 return_router_loss=True).loss


routing_loss_fn.through_forward = True  # bts.train.loop may shard the model with FSDP2 for this loss


def train_router(router: SequenceRouter, members, batches, steps: int, lr: float = 5e-4, seed: int = 0) -> list:
    """A minimal loop (constant lr, AdamW without weight decay) cycling over `batches`; targets are computed once
    per batch. Returns the loss of every step."""
    members = _check_members(members)
    if steps < 1:
        raise BTSError(f"steps must be at least 1 (got {steps}).")
    device = next(members[0].parameters()).device
    batches = [as_batch(b, device) for b in batches]
    if not batches:
        raise BTSError("batches: no sequences were given to train the router on.")
    targets = [member_losses(members, ids, mask).argmin(-1) for ids, mask in batches]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=0.0)
    router.train()
    losses = []
    for step in range(steps):
        ids, mask = batches[step % len(batches)]
        loss = router_loss(router, members, ids, mask, generator, targets[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    router.eval()
    return losses


def _check_members(members) -> list[nn.Module]:
    members = list(members)
    if not members:
        raise BTSError("members: at least one member (the seed) is needed (got none).")
    return members


# ---- the routed model ---------------------------------------------------------------------------------------------
@strict
class RoutedConfig(MemberSetConfig):
    model_type = "bts_routed"

    def cache_copies(self) -> int:
        return 1  # one member runs per sequence


class RoutedModel(CompositeModel):
    """Frozen members and a trainable `SequenceRouter`; each sequence is handled by its router-chosen member."""

    config_class = RoutedConfig
    base_model_prefix = "routed"
    kind = "routed model"
    weights_file = ROUTER_WEIGHTS

    def __init__(self, config: RoutedConfig, members: list[nn.Module] | None = None):
        super().__init__(config)
        self.router = SequenceRouter(config.base_config.hidden_size, config.num_members)
        self.attach_members(members)

    @classmethod
    def from_members(cls, members, *, names: list[str] | None = None, router: SequenceRouter | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "RoutedModel":
        """Frozen members (read onto `device` in `dtype`) and a router (fp32 master weights), given or fresh."""
        loaded = load_member_set(members, names, dtype, device=device)
        model = cls(cls.config_for(loaded), members=[m.model for m in loaded])
        if device is not None:
            model.to(device)
        if router is not None:
            if router.proj.weight.shape != model.router.proj.weight.shape:
                raise BTSError(f"router: shape {tuple(router.proj.weight.shape)} does not fit "
                               f"{len(loaded)} members of width {model.config.hidden_size}.")
            model.router.load_state_dict(router.state_dict())
        return model

    def _init_weights(self, module):
        if isinstance(module, SequenceRouter):
            module.proj.reset_parameters()

    def param_counts(self) -> dict:
        """total: every member + the router; active: one member + the router; trainable: the router (d·m + m)."""
        router = sum(p.numel() for p in self.router.parameters())
        members = [sum(p.numel() for p in m.parameters()) for m in self.members]
        return {"total": sum(members) + router, "active": max(members) + router, "trainable": router}

    # ---- routing ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def choose(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The member each sequence goes to: argmax of the router on the mean embedding of the whole prompt. [B]"""
        features = mean_prefix_embedding(self.members[0].get_input_embeddings(), input_ids, attention_mask)
        return self.router(features).argmax(-1)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, choice=None,
                inputs_embeds=None, return_router_loss: bool = False, **kwargs):
        """Each row's logits (and the loss) from its chosen member. `choice` [B] overrides the router, e.g. to
        route on a context but score context + continuation. No KV cache: `generate` hands decoding to the member.
        return_router_loss=True instead returns the router's training loss (see `router_loss`) as `.loss`."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("RoutedModel needs input_ids: routing reads the seed's embedding of the tokens.")
        if return_router_loss:
            return CausalLMOutput(loss=router_loss(self.router, list(self.members), input_ids, attention_mask))
        for key in ("cache", "past_key_values"):
            if kwargs.pop(key, None) is not None:
                raise ValueError("RoutedModel.forward keeps no cache; use generate(), which decodes with the member.")
        kwargs.pop("use_cache", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, input_ids.shape[1])
        choice = self.choose(input_ids, attention_mask) if choice is None else choice.to(input_ids.device)
        logits = None
        for j in choice.unique().tolist():
            rows = (choice == j).nonzero().squeeze(-1)
            out = self.members[j](input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                  position_ids=position_ids[rows]).logits.float()
            if logits is None:
                logits = out.new_empty(*input_ids.shape, out.shape[-1])
            logits[rows] = out
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """Route each prompt once, then let its member generate alone (with its own KV cache). Groups that stop
        early are right-padded with pad_token_id, as generate pads finished sequences. Returns token ids."""
        if input_ids is None:
            raise ValueError("RoutedModel.generate needs input_ids.")
        if kwargs.get("return_dict_in_generate"):
            raise ValueError("RoutedModel.generate returns token ids only (return_dict_in_generate is unsupported).")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        choice = self.choose(input_ids, attention_mask)
        per_prompt = kwargs.get("num_return_sequences") or 1
        pieces = {}
        for j in choice.unique().tolist():
            rows = (choice == j).nonzero().squeeze(-1)
            out = self.members[j].generate(input_ids=input_ids[rows], attention_mask=attention_mask[rows], **kwargs)
            pieces[j] = (rows, out.view(len(rows), per_prompt, -1))
        width = max(out.shape[-1] for _, out in pieces.values())
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.config.eos_token_id
        result = input_ids.new_full((input_ids.shape[0], per_prompt, width), pad if pad is not None else 0)
        for rows, out in pieces.values():
            result[rows, :, : out.shape[-1]] = out
        return result.view(-1, width)

    # ---- saving and loading: bts.baselines.composite; the router's weights go into ROUTER_WEIGHTS --------------------
    def _save_own(self, out, config: RoutedConfig) -> None:
        atomic_save_safetensors(out / ROUTER_WEIGHTS, self.router.state_dict(), metadata={"format": "pt"})

    def _load_own(self, folder) -> None:
        from safetensors.torch import load_file

        try:
            self.router.load_state_dict(load_file(folder / ROUTER_WEIGHTS))
        except Exception as exc:
            raise BTSError(f"'{folder / ROUTER_WEIGHTS}' does not hold this model's router ({exc}).") from None


AutoConfig.register("bts_routed", RoutedConfig)
AutoModelForCausalLM.register(RoutedConfig, RoutedModel)


# ---- the `routing` baseline ---------------------------------------------------------------------------------------
class _RouteOnPrefix(torch.nn.Module):
    """Scores a window with the member the router picks from the window's first tokens only (no peeking at the
    tokens being predicted)."""

    def __init__(self, routed):
        super().__init__()
        self.routed = routed

    def forward(self, input_ids, **kwargs):
        choice = self.routed.choose(input_ids[:, :ROUTE_PREFIX])
        return self.routed(input_ids=input_ids, choice=choice, **kwargs)


class RoutingBaseline(Baseline):
    """`routing`: the router trained on the stitch datamix for the stitch's steps and batch size at the paper's
    constant learning rate (baselines.routing_lr); scores each window with the member chosen on its first
    ROUTE_PREFIX tokens."""

    options = ("routing_lr",)
    trained = True

    def check(self, options, prefix: str = "baselines.") -> None:
        positive(options.routing_lr, f"{prefix}routing_lr")

    def budget(self, recipe):
        return dataclasses.replace(recipe.stitch.train, lr=recipe.baselines.routing_lr, warmup=0, min_lr_ratio=1.0)

    def build(self, run) -> dict:
        from bts.train import distributed

        seed, experts = run_members(run)
        model = RoutedModel.from_members([seed, *experts], names=["seed", *run.recipe.expert_domains],
                                         dtype=run.members_dtype, device=run.device)
        trainable = {f"router.{k}": p for k, p in model.router.named_parameters()}
        result = train_on_stitch_mix(run, self.name, model, trainable, self.budget(run.recipe),
                                     loss_fn=routing_loss_fn)
        if distributed.is_main():
            model.save_pretrained(run.model_dir(self.name))
        return result

    def load(self, path, info: dict, device=None, dtype=None):
        model = RoutedModel.from_pretrained(path, dtype=dtype, device_map=device).eval()
        return _RouteOnPrefix(model), accounting(model.param_counts())


BASELINES = (RoutingBaseline("routing"),)
