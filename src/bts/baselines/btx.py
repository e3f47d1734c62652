"""BTX (Branch-Train-MiX, arXiv 2403.07816): the members' FFNs become the experts of one Mixtral MoE.

    model = build_btx(seed, [code, math], routing="top2")          # seed + 2 experts -> 3 MoE experts per layer
    trainable = btx_trainable_parameters(model, "full")            # or "router": only *.mlp.gate.weight
    train(model, trainable, batches, cfg, out, step_hook=functools.partial(set_btx_step, model))
    save_btx(model, "btx/")                                        # a stock Mixtral checkpoint

Layout (transformers 5.x Mixtral): expert e of layer l holds member e's FFN in the fused tensors
`mlp.experts.gate_up_proj[e] = [gate_proj; up_proj]` ([2F, d]) and `mlp.experts.down_proj[e]` ([d, F]); the router
`mlp.gate.weight` ([E, d]) is new and random (seeded). Every other weight (embeddings, attention, norms, lm_head) is
the average of the members, as BTX does; mergekit-moe instead copies them from its base model.

Routing variants (config attribute `bts_routing`, saved in config.json):
- "top2": Mixtral's own router, softmax over the two largest logits (num_experts_per_tok = 2).
- "soft": every expert runs, weighted by the softmax over all of them (num_experts_per_tok = E).
- "sampled_top1": while training, a Gumbel-softmax soft sample y = softmax((logits + G) / tau) picks the argmax
  expert, which alone runs, scaled by its y (so the router gets a gradient); tau = max(0.5, exp(-1e-4 * step)),
  set by `set_btx_step`. At inference the argmax of the logits runs with weight 1 (Mixtral top-1). Layer 0 always
  routes softly, as in the paper; a plain `AutoModelForCausalLM` load cannot express that per-layer exception, so
  load sampled_top1 checkpoints with `load_btx` (top2 and soft ones are exact under a plain load).

Load balancing (training mode only, all variants): per layer L_LB = N * sum_i u_i * p_i, with u_i the batch mean
of routing weight g_i (zero where expert i was not picked) and p_i the batch mean of softmax_i(router logits),
padding excluded; the per-layer terms are summed and alpha = config.router_aux_loss_coef (0.01) times that sum is
added to the NLL. transformers' own `load_balancing_loss_func` is not used: it counts hard top-k assignments (so
under soft routing it is the constant N and balances nothing), ignores the Gumbel sample, and pools all layers
before multiplying. A plain-transformers load of the checkpoint still trains with that Switch-style loss.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from bts.atomic import atomic_write_json
from bts.baselines.base import Baseline, positive, run_members, train_on_stitch_mix, write_model_dir
from bts.core.members import Member, check_compatible, load_causal_lm
from bts.errors import BTSError

ROUTINGS = ("top2", "sampled_top1", "soft")
TRAINABLE = ("full", "router")
ALPHA = 0.01  # BTX's load-balancing coefficient
GUMBEL_RATE = 1e-4
GUMBEL_MIN_TAU = 0.5
# Mixtral's attention and FFN are Llama's without biases, so only these families map onto it weight for weight.
SOURCE_TYPES = ("llama", "mistral")
# Config fields that change the computation without changing any tensor shape: members must agree on them.
SAME_FIELDS = ("hidden_act", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "sliding_window",
               "head_dim", "max_position_embeddings")
FFN_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight")


def gumbel_temperature(step: int) -> float:
    """BTX sample-top-1 temperature tau = max(0.5, exp(-r * t)), r = 1e-4, t = training step."""
    return max(GUMBEL_MIN_TAU, math.exp(-GUMBEL_RATE * step))


# ---- routing ----------------------------------------------------------------------------------------------------
class BTXRouter(MixtralTopKRouter):
    """Mixtral's router with BTX's routing variants, recording what the load-balancing loss needs.

    It relies on one transformers internal (5.24): the sparse-MoE block calls `gate(hidden)` and uses the returned
    (logits, weights [T, k], expert indices [T, k]); the weights and parameter name are Mixtral's, so the state dict
    is a stock Mixtral one.
    """

    def __init__(self, config: MixtralConfig, layer_idx: int):
        super().__init__(config)
        self.routing = routing_of(config)
        self.layer_idx = layer_idx
        self.step = 0  # training step, for the Gumbel temperature (set_btx_step)
        if self.routing == "soft" or (self.routing == "sampled_top1" and layer_idx == 0):
            self.top_k = self.num_experts  # every expert, softmax weights
        self.routed: tuple[torch.Tensor, torch.Tensor] | None = None  # (dense g [T, E], probs [T, E]), training

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        scores = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 routing (fp64 in fp64 models)
        probs = scores.softmax(dim=-1)
        if self.training and self.routing == "sampled_top1" and self.top_k == 1:
            sample = F.gumbel_softmax(scores, tau=gumbel_temperature(self.step), hard=False)
            weights, index = sample.max(dim=-1, keepdim=True)  # only the sampled expert runs, scaled by its y
        else:
            weights, index = torch.topk(probs, self.top_k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.training:
            self.routed = (torch.zeros_like(probs).scatter(-1, index, weights), probs)
        return logits, weights, index


def load_balancing_loss(routed: list[tuple[torch.Tensor, torch.Tensor]], attention_mask=None) -> torch.Tensor:
    """Sum over layers of N * sum_i u_i * p_i (BTX), padding positions excluded when a 2-D mask is given.
    Under torchrun the batch means u and p are taken over the global batch, so the loss and its gradient equal
    the one-process run's."""
    total = 0.0
    for g, probs in routed:
        rows, n = probs.shape
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.numel() == rows:
            w = attention_mask.reshape(-1, 1).to(probs)
        else:
            w = torch.ones(rows, 1, dtype=probs.dtype, device=probs.device)
        count = w.sum()
        u, p = _global_mean((g * w).sum(0), count), _global_mean((probs * w).sum(0), count)
        total = total + n * (u * p).sum()
    return total


def _global_mean(local_sum: torch.Tensor, local_count: torch.Tensor) -> torch.Tensor:
    """Mean over every rank's rows. The value is global; the gradient flows through this rank's rows only, scaled by
    the world size because the training loop averages gradients over ranks (so their sum is the global gradient)."""
    from bts.train import distributed

    if not distributed.active():
        return local_sum / local_count.clamp_min(1)
    world = distributed.world()
    total, count = local_sum.detach().clone(), local_count.detach().clone()
    torch.distributed.all_reduce(total)
    torch.distributed.all_reduce(count)
    local = local_sum * world / count.clamp_min(1)
    return local + (total / count.clamp_min(1) - local).detach()


class BTXForCausalLM(MixtralForCausalLM):
    """A Mixtral whose routers follow `config.bts_routing` and whose training loss carries BTX's load balancing."""

    def __init__(self, config: MixtralConfig):
        super().__init__(config)
        std = getattr(config, "initializer_range", 0.02)
        for i, layer in enumerate(self.model.layers):
            router = BTXRouter(config, i)
            nn.init.normal_(router.weight, std=std)  # overwritten by build_btx / from_pretrained
            layer.mlp.gate = router

    def routers(self) -> list[BTXRouter]:
        return [layer.mlp.gate for layer in self.model.layers]

    def forward(self, input_ids=None, attention_mask=None, labels=None, output_router_logits=None, **kwargs):
        want_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        return_dict = kwargs.pop("return_dict", None)
        # The stock forward without labels, so its own router loss stays out; the NLL is computed the same way below.
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=None,
                              output_router_logits=want_logits, return_dict=True, **kwargs)
        routed = [r.routed for r in self.routers() if r.routed is not None]  # recorded in training mode only
        for r in self.routers():
            r.routed = None  # drop the graph references as soon as they are used
        aux = load_balancing_loss(routed, attention_mask) if self.training and routed else None
        loss = None
        if labels is not None:
            loss = self.loss_function(out.logits, labels, self.vocab_size, **kwargs)
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux
        out = dataclasses.replace(out, loss=loss, aux_loss=aux)  # a new output keeps the field order for to_tuple
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        # transformers records the Python class name; write the stock one so every Mixtral loader accepts the dir.
        path = Path(save_directory) / "config.json"
        config = json.loads(path.read_text())
        config["architectures"] = ["MixtralForCausalLM"]
        atomic_write_json(path, config)


def routing_of(config) -> str:
    """The routing variant of a Mixtral config: `bts_routing`, or inferred for a plain Mixtral (k = 2 or k = E)."""
    routing = getattr(config, "bts_routing", None)
    if routing is None:
        k, n = config.num_experts_per_tok, config.num_local_experts
        routing = "soft" if k == n else "top2" if k == 2 else None
        if routing is None:
            raise BTSError(f"num_experts_per_tok={k} with {n} experts is not a BTX routing (top2, soft) and the "
                           "config has no bts_routing.")
    if routing not in ROUTINGS:
        raise BTSError(f"routing '{routing}' is not one of {', '.join(ROUTINGS)}.")
    return routing


def set_btx_step(model: nn.Module, step: int) -> None:
    """Tell every BTX router the training step (drives the sample-top-1 Gumbel temperature); use as step_hook."""
    if step < 0:
        raise BTSError(f"step must be >= 0 (got {step}).")
    for module in model.modules():
        if isinstance(module, BTXRouter):
            module.step = step


# ---- building ---------------------------------------------------------------------------------------------------
def _check_members(members: list[Member]) -> None:
    for m in members:
        cfg = m.model.config
        if cfg.model_type not in SOURCE_TYPES:
            raise BTSError(f"member '{m.name}' has model_type '{cfg.model_type}', which has no Mixtral form "
                           f"(BTX supports {', '.join(SOURCE_TYPES)}).")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(cfg, flag, False):
                raise BTSError(f"member '{m.name}' has {flag}=True, but Mixtral has no biases.")
    ref = members[0]
    ref_shapes = {k: v.shape for k, v in ref.model.state_dict().items()}
    for m in members[1:]:
        for field in SAME_FIELDS:
            a, b = getattr(ref.model.config, field, None), getattr(m.model.config, field, None)
            if a != b:
                raise BTSError(f"member '{m.name}' has {field}={b} but '{ref.name}' has {field}={a}.")
        shapes = {k: v.shape for k, v in m.model.state_dict().items()}
        if shapes != ref_shapes:
            key = next(k for k in sorted(set(shapes) | set(ref_shapes)) if shapes.get(k) != ref_shapes.get(k))
            raise BTSError(f"member '{m.name}' has tensor {key} of shape {shapes.get(key)} but '{ref.name}' has "
                           f"{ref_shapes.get(key)}.")


def btx_config(source, n_experts: int, routing: str) -> MixtralConfig:
    """A Mixtral config with the members' dense architecture, n_experts experts per layer and BTX routing."""
    s = source
    k = {"top2": 2, "sampled_top1": 1, "soft": n_experts}[routing]
    return MixtralConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        head_dim=getattr(s, "head_dim", None) or s.hidden_size // s.num_attention_heads,
        hidden_act=s.hidden_act, max_position_embeddings=s.max_position_embeddings,
        initializer_range=s.initializer_range, rms_norm_eps=s.rms_norm_eps, rope_parameters=s.rope_parameters,
        tie_word_embeddings=s.tie_word_embeddings, sliding_window=getattr(s, "sliding_window", None),
        attention_dropout=getattr(s, "attention_dropout", 0.0),
        bos_token_id=s.bos_token_id, eos_token_id=s.eos_token_id, pad_token_id=s.pad_token_id,
        num_local_experts=n_experts, num_experts_per_tok=k, router_aux_loss_coef=ALPHA, output_router_logits=True,
        bts_routing=routing, architectures=["MixtralForCausalLM"],
    )


def build_btx(seed, experts, *, include_seed: bool = True, routing: str = "top2",
              router_init_std: float | None = None, seed_rng: int = 0) -> BTXForCausalLM:
    """Mix a seed and its branched experts (HF dirs or loaded *ForCausalLM) into one untrained BTX MoE.

    The MoE experts are [seed, *experts] (or just `experts` with include_seed=False), in that order; their FFNs
    become the experts and all their other weights are averaged. Each layer gets a new router drawn from
    N(0, router_init_std^2) (default: the seed's initializer_range) with a generator seeded by seed_rng.
    """
    if routing not in ROUTINGS:
        raise BTSError(f"routing '{routing}' is not one of {', '.join(ROUTINGS)}.")
    if isinstance(experts, (str, os.PathLike, nn.Module)):
        experts = [experts]
    seed_member = Member("seed", *load_causal_lm(seed, "seed"))
    expert_members = []
    for i, spec in enumerate(experts):
        model, path = load_causal_lm(spec, f"expert {i + 1}")
        expert_members.append(Member(f"expert{i + 1}", model, path))
    check_compatible(seed_member, expert_members)
    moe = ([seed_member] if include_seed else []) + expert_members
    if len(moe) < 2:
        raise BTSError(f"experts: BTX needs at least 2 MoE experts, got {len(moe)} "
                       "(add experts or keep the seed as an expert).")
    if router_init_std is not None and not router_init_std > 0:
        raise BTSError(f"router_init_std must be > 0 (got {router_init_std}).")
    _check_members([seed_member] + expert_members)

    config = btx_config(seed_member.model.config, len(moe), routing)
    dtype = next(seed_member.model.parameters()).dtype
    state = _mixed_state_dict([m.model.state_dict() for m in moe], config, dtype)
    gen = torch.Generator().manual_seed(seed_rng)
    std = router_init_std if router_init_std is not None else config.initializer_range
    for layer in range(config.num_hidden_layers):
        state[f"model.layers.{layer}.mlp.gate.weight"] = (
            torch.randn(len(moe), config.hidden_size, generator=gen) * std).to(dtype)

    model = BTXForCausalLM(config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:  # a Llama/Mistral variant with tensors Mixtral has no slot for (or lacks)
        raise BTSError(f"seed '{seed_member.path or 'in-memory model'}' does not map onto Mixtral "
                       f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}).")
    model._bts_tokenizer_dir = seed_member.path
    model._bts_btx = {  # provenance, written by save_btx as bts_btx.json
        "routing": routing, "include_seed": include_seed, "seed_rng": seed_rng, "router_init_std": std,
        "experts": [{"name": m.name, "path": m.path} for m in moe],
        "seed": {"name": seed_member.name, "path": seed_member.path},
    }
    return model.eval()


def _mixed_state_dict(states: list[dict], config: MixtralConfig, dtype: torch.dtype) -> dict:
    """FFN tensors stacked into Mixtral's fused experts (one per member); every other tensor averaged in fp32."""
    out, ffn = {}, {}
    for key in states[0]:
        match = FFN_KEY.fullmatch(key)
        if match:
            ffn[(int(match.group(1)), match.group(2))] = torch.stack([s[key] for s in states])
        else:
            out[key] = torch.stack([s[key].float() for s in states]).mean(0).to(dtype)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        try:
            gate, up, down = (ffn[(layer, name)] for name in ("gate_proj", "up_proj", "down_proj"))
        except KeyError:
            raise BTSError(f"members have no Llama-style FFN (gate_proj/up_proj/down_proj) in layer {layer}.") from None
        out[f"{prefix}.experts.gate_up_proj"] = torch.cat([gate, up], dim=1).to(dtype)  # [E, 2F, d], gate first
        out[f"{prefix}.experts.down_proj"] = down.to(dtype)  # [E, d, F]
    return out


# ---- training options, accounting, saving -----------------------------------------------------------------------
def btx_trainable_parameters(model: nn.Module, trainable: str = "full") -> dict[str, nn.Parameter]:
    """Set requires_grad for BTX's full finetune ("full") or router-only training ("router"); return the trainables."""
    check_trainable(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "full" or name.endswith(".mlp.gate.weight"))
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def check_trainable(trainable: str, key: str = "trainable") -> None:
    if trainable not in TRAINABLE:
        raise BTSError(f"{key} '{trainable}' is not one of {', '.join(TRAINABLE)}.")


def btx_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total, trainable and active-per-token parameters (shared weights + the FFN experts each token runs)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    idle = 0
    for layer in model.model.layers:
        experts, router = layer.mlp.experts, layer.mlp.gate
        per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // router.num_experts
        idle += (router.num_experts - router.top_k) * per_expert
    return {"total": total, "trainable": trainable, "active": total - idle}


def load_btx(path, dtype: torch.dtype | None = None) -> BTXForCausalLM:
    """Load a BTX (or plain Mixtral) checkpoint with its routing variant restored (needed for sampled_top1)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise BTSError(f"BTX path '{path}' is not a model directory (no config.json).")
    config = MixtralConfig.from_pretrained(folder)
    if config.model_type != "mixtral":
        raise BTSError(f"BTX path '{path}' holds model_type '{config.model_type}', not a Mixtral.")
    config.bts_routing = routing_of(config)
    return BTXForCausalLM.from_pretrained(folder, config=config, dtype=dtype or torch.float32).eval()


def save_btx(model: BTXForCausalLM, out_dir, *, force: bool = False, tokenizer_from=None) -> Path:
    """Save as a stock Mixtral checkpoint, plus the seed's tokenizer files and (for a built model) bts_btx.json.

    The folder is written next to its target and renamed into place, so a failure leaves nothing behind; an
    existing non-empty out_dir is refused unless force=True, and never replaced if it holds a member.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise BTSError(f"out '{out}' already exists and is not empty (use --force to replace it).")
    provenance = getattr(model, "_bts_btx", None)
    sources = [m["path"] for m in ([provenance["seed"]] + provenance["experts"]) if m["path"]] if provenance else []
    for src in sources:  # force must never delete a member the model was built from
        if out.exists() and (Path(src).resolve() == out.resolve() or out.resolve() in Path(src).resolve().parents):
            raise BTSError(f"out '{out}' is (or contains) the member directory '{src}'; choose another out.")
    return write_model_dir(model, out, tokenizer_from=tokenizer_from or getattr(model, "_bts_tokenizer_dir", None),
                           record=("bts_btx.json", provenance) if provenance is not None else None)


# ---- the btx_* baselines ------------------------------------------------------------------------------------------
class BTXBaseline(Baseline):
    """`btx_<routing>`: seed + experts as the MoE's experts, trained on the stitch datamix for the stitch's steps and
    batch size (the same token budget) at baselines.btx_lr, training baselines.btx_trainable."""

    options = ("btx_lr", "btx_trainable")
    trained = True

    def __init__(self, name: str, routing: str):
        super().__init__(name)
        self.routing = routing

    def check(self, options, prefix: str = "baselines.") -> None:
        positive(options.btx_lr, f"{prefix}btx_lr")
        check_trainable(options.btx_trainable, f"{prefix}btx_trainable")

    def budget(self, recipe):
        return dataclasses.replace(recipe.stitch.train, lr=recipe.baselines.btx_lr)  # the stitch's steps and batch

    def build(self, run) -> dict:
        from bts.train import distributed

        seed, experts = run_members(run)
        model = build_btx(seed, experts, routing=self.routing, seed_rng=run.recipe.seed)
        trainable = btx_trainable_parameters(model, run.recipe.baselines.btx_trainable)
        counts = btx_parameter_counts(model)
        result = train_on_stitch_mix(run, self.name, model, trainable, self.budget(run.recipe),
                                     step_hook=functools.partial(set_btx_step, model))
        if distributed.is_main():
            save_btx(model, run.path("models", self.name), force=True, tokenizer_from=seed)
        return {**result, "trainable_params": counts["trainable"], "total_params": counts["total"],
                "active_params": counts["active"]}

    def load(self, path, info: dict):
        return load_btx(path), {k: info[k] for k in ("trainable_params", "total_params", "active_params")}


BASELINES = tuple(BTXBaseline(f"btx_{routing}", routing) for routing in ROUTINGS)  # top2, sampled_top1, soft
