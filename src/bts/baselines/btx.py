"""BTX (Branch-Train-MiX, arXiv 2403.07816): the members' FFNs become the experts of one upcycled MoE, any family.

    model = build_btx(seed, [code, math], routing="top2")          # seed + 2 experts -> 3 MoE experts per layer
    trainable = btx_trainable_parameters(model, "full")            # or "router": only *.mlp.gate.weight
    train(model, trainable, batches, cfg, out, step_hook=functools.partial(set_btx_step, model))
    save_btx(model, "btx/")                                        # model type "bts_btx" (AutoModelForCausalLM)
    save_btx(model, "mixtral/", export="mixtral")                  # Llama / Mistral seeds: a stock Mixtral folder
    model = load_btx("btx/")                                       # either format

The model (bts.baselines.btx_moe.BTXForCausalLM) is the seed's own architecture with every layer's FFN replaced by
a router `mlp.gate.weight` ([E, d], new, random, seeded) and the experts `mlp.experts`: expert e of layer l is
member e's FFN (for gated FFNs in Mixtral's fused layout `experts.gate_up_proj[e] = [gate; up]` ([2F, d]),
`experts.down_proj[e]` ([d, F])). Every other weight (embeddings, attention, norms, lm_head) is the average of the
members, as BTX does; mergekit-moe instead copies them from its base model. Routing variants and load balancing:
see btx_moe. Folders written before bts_btx existed (stock Mixtral with `bts_routing`) still load with load_btx.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from bts.baselines.base import Baseline, positive, run_members, train_on_stitch_mix, write_model_dir
from bts.baselines.btx_moe import (ALPHA, ROUTINGS, BTXConfig, BTXForCausalLM, BTXRouter, FusedExperts,
                                   gumbel_temperature, load_balancing_loss, set_btx_step)
from bts.core.device import load_kwargs, on_device
from bts.core.members import Member, check_compatible, load_causal_lm
from bts.errors import BTSError

__all__ = ["ALPHA", "ROUTINGS", "TRAINABLE", "BTXConfig", "BTXForCausalLM", "BTXRouter", "build_btx", "load_btx",
           "save_btx", "btx_parameter_counts", "btx_trainable_parameters", "set_btx_step", "load_balancing_loss",
           "gumbel_temperature", "routing_of", "EXPORTS"]

TRAINABLE = ("full", "router")
EXPORTS = ("bts", "mixtral")
# Mixtral's attention and FFN are Llama's without biases, so only these families map onto it weight for weight.
MIXTRAL_TYPES = ("llama", "mistral")
# Config fields that never change the computation: members may differ in them.
FREE_FIELDS = {"_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version", "use_cache",
               "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id"}
LAYER_FFN = re.compile(r"model\.layers\.\d+\.mlp\.")


# ---- building ---------------------------------------------------------------------------------------------------
def _check_members(members: list[Member]) -> None:
    ref = members[0]
    ref_shapes = {k: v.shape for k, v in ref.model.state_dict().items()}
    ref_config = ref.model.config.to_dict()
    for m in members[1:]:
        shapes = {k: v.shape for k, v in m.model.state_dict().items()}
        if shapes != ref_shapes:
            key = next(k for k in sorted(set(shapes) | set(ref_shapes)) if shapes.get(k) != ref_shapes.get(k))
            raise BTSError(f"member '{m.name}' has tensor {key} of shape {shapes.get(key)} but '{ref.name}' has "
                           f"{ref_shapes.get(key)}.")
        config = m.model.config.to_dict()
        for field in sorted(set(config) | set(ref_config)):
            if field not in FREE_FIELDS and config.get(field) != ref_config.get(field):
                raise BTSError(f"member '{m.name}' has {field}={config.get(field)} but '{ref.name}' has "
                               f"{field}={ref_config.get(field)}.")


def btx_config(source, n_experts: int, routing: str) -> BTXConfig:
    """A bts_btx config: the members' dense architecture, n_experts experts per layer, BTX routing."""
    if routing not in ROUTINGS:
        raise BTSError(f"routing '{routing}' is not one of {', '.join(ROUTINGS)}.")
    base = source.to_dict()
    base.pop("architectures", None)
    config = BTXConfig(base_config=base, num_local_experts=n_experts, bts_routing=routing,
                       router_aux_loss_coef=ALPHA, output_router_logits=True, architectures=["BTXForCausalLM"],
                       bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id,
                       pad_token_id=source.pad_token_id)
    config._attn_implementation = source._attn_implementation
    return config


def build_btx(seed, experts, *, include_seed: bool = True, routing: str = "top2",
              router_init_std: float | None = None, seed_rng: int = 0,
              device: torch.device | str | None = None) -> BTXForCausalLM:
    """Mix a seed and its branched experts (HF dirs or loaded *ForCausalLM) into one untrained BTX MoE.

    The MoE experts are [seed, *experts] (or just `experts` with include_seed=False), in that order; their FFNs
    become the experts and all their other weights are averaged. Each layer gets a new router drawn from
    N(0, router_init_std^2) (default: the seed's initializer_range) with a generator seeded by seed_rng.
    """
    if routing not in ROUTINGS:
        raise BTSError(f"routing '{routing}' is not one of {', '.join(ROUTINGS)}.")
    if isinstance(experts, (str, os.PathLike, nn.Module)):
        experts = [experts]
    seed_member = Member("seed", *load_causal_lm(seed, "seed", device=device))
    expert_members = []
    for i, spec in enumerate(experts):
        model, path = load_causal_lm(spec, f"expert {i + 1}", device=device)
        expert_members.append(Member(f"expert{i + 1}", model, path))
    check_compatible(seed_member, expert_members)
    moe = ([seed_member] if include_seed else []) + expert_members
    if len(moe) < 2:
        raise BTSError(f"experts: BTX needs at least 2 MoE experts, got {len(moe)} "
                       "(add experts or keep the seed as an expert).")
    if router_init_std is not None and not router_init_std > 0:
        raise BTSError(f"router_init_std must be > 0 (got {router_init_std}).")
    _check_members([seed_member] + expert_members)

    source = seed_member.model.config
    config = btx_config(source, len(moe), routing)
    dtype = next(seed_member.model.parameters()).dtype
    with on_device(device):  # built where it will train (device: default the CPU), never copied there
        model = BTXForCausalLM(config).to(dtype)
    states = [m.model.state_dict() for m in moe]
    shared = {k: torch.stack([s[k].float() for s in states]).mean(0).to(dtype)  # averaged in fp32
              for k in states[0] if not LAYER_FFN.match(k)}
    gen = torch.Generator().manual_seed(seed_rng)
    std = router_init_std if router_init_std is not None else getattr(source, "initializer_range", 0.02)
    for layer in range(source.num_hidden_layers):
        shared[f"model.layers.{layer}.mlp.gate.weight"] = (
            torch.randn(len(moe), source.hidden_size, generator=gen) * std).to(dtype)
    missing, unexpected = model.load_state_dict(shared, strict=False)
    missing = [k for k in missing if not (LAYER_FFN.match(k) and ".mlp.experts." in k)
               and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise BTSError(f"seed '{seed_member.path or 'in-memory model'}' does not map onto BTX's layout "
                       f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}).")
    for layer, block in enumerate(model.model.layers):
        block.mlp.experts.load_members([m.model.model.layers[layer].mlp for m in moe])
    model._bts_tokenizer_dir = seed_member.path
    model._bts_btx = {  # provenance, written by save_btx as bts_btx.json
        "routing": routing, "include_seed": include_seed, "seed_rng": seed_rng, "router_init_std": std,
        "experts": [{"name": m.name, "path": m.path} for m in moe],
        "seed": {"name": seed_member.name, "path": seed_member.path},
    }
    return model.eval()


# ---- training options, accounting -------------------------------------------------------------------------------
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
        per_expert = sum(p.numel() for p in experts.parameters()) // router.num_experts
        idle += (router.num_experts - router.top_k) * per_expert
    return {"total": total, "trainable": trainable, "active": total - idle}


# ---- the Mixtral format (export for Llama / Mistral seeds; folders written by bts before bts_btx) --------------
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


def mixtral_config(model: BTXForCausalLM):
    """The stock Mixtral config of a BTX model over a Llama / Mistral seed (refused for any other)."""
    from transformers import MixtralConfig

    s, config = model.config.base_config, model.config
    if s.model_type not in MIXTRAL_TYPES:
        raise BTSError(f"export 'mixtral' needs a Llama or Mistral seed; this BTX's seed is '{s.model_type}' "
                       "(save it in the bts_btx format instead).")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(s, flag, False):
            raise BTSError(f"export 'mixtral': the seed has {flag}=True, but Mixtral has no biases.")
    if not all(isinstance(layer.mlp.experts, FusedExperts) for layer in model.model.layers):
        raise BTSError("export 'mixtral': the experts are not gated FFNs in Mixtral's layout.")
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
        num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok,
        router_aux_loss_coef=config.router_aux_loss_coef, output_router_logits=True,
        bts_routing=config.bts_routing, architectures=["MixtralForCausalLM"],
    )


def _from_mixtral(folder: Path, dtype: torch.dtype) -> BTXForCausalLM:
    """A stock Mixtral folder (as bts wrote BTX before bts_btx, or any Mixtral) as a BTX model over its dense base."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, MixtralForCausalLM

    mc = MixtralConfig.from_pretrained(folder)
    routing = routing_of(mc)
    fields = dict(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
                  num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
                  num_key_value_heads=mc.num_key_value_heads, head_dim=mc.head_dim, hidden_act=mc.hidden_act,
                  max_position_embeddings=mc.max_position_embeddings, initializer_range=mc.initializer_range,
                  rms_norm_eps=mc.rms_norm_eps, rope_parameters=mc.rope_parameters,
                  tie_word_embeddings=mc.tie_word_embeddings, attention_dropout=mc.attention_dropout,
                  bos_token_id=mc.bos_token_id, eos_token_id=mc.eos_token_id, pad_token_id=mc.pad_token_id)
    base = (MistralConfig(sliding_window=mc.sliding_window, **fields) if mc.sliding_window is not None
            else LlamaConfig(attention_bias=False, mlp_bias=False, **fields))
    if mc.num_local_experts < 2 and routing != "soft":
        raise BTSError(f"'{folder}' has {mc.num_local_experts} experts; BTX needs at least 2.")
    mixtral = MixtralForCausalLM.from_pretrained(folder, config=mc, dtype=dtype)
    config = btx_config(base, mc.num_local_experts, routing)
    config.router_aux_loss_coef = mc.router_aux_loss_coef
    config._attn_implementation = mixtral.config._attn_implementation
    model = BTXForCausalLM(config).to(dtype)
    model.load_state_dict(mixtral.state_dict(), strict=not config.tie_word_embeddings)
    return model.eval()


# ---- saving and loading -----------------------------------------------------------------------------------------
def load_btx(path, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> BTXForCausalLM:
    """Load a BTX checkpoint: the bts_btx format, or a Mixtral one (bts's export, its format before bts_btx, or a
    plain Mixtral, whose routing is inferred: k = 2 -> top2, k = E -> soft)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise BTSError(f"BTX path '{path}' is not a model directory (no config.json).")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type == "mixtral":
        model = _from_mixtral(folder, dtype or torch.float32)
        return model if device is None else model.to(device)
    if model_type != "bts_btx":
        raise BTSError(f"BTX path '{path}' holds model_type '{model_type}', not a BTX (bts_btx or mixtral).")
    return BTXForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, **load_kwargs(device)).eval()


def _as_mixtral(model: BTXForCausalLM):
    """A stock MixtralForCausalLM holding the BTX's weights (the same tensors: the layouts agree key for key)."""
    from transformers import MixtralForCausalLM

    config = mixtral_config(model)
    with torch.device("meta"):
        mixtral = MixtralForCausalLM(config)
    mixtral.load_state_dict(model.state_dict(), strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        mixtral.tie_weights()
    return mixtral


def save_btx(model: BTXForCausalLM, out_dir, *, force: bool = False, tokenizer_from=None,
             export: str = "bts") -> Path:
    """Save as a bts_btx checkpoint (export="bts") or, for a Llama / Mistral seed, a stock Mixtral one
    (export="mixtral"), plus the seed's tokenizer files and (for a built model) bts_btx.json.

    The folder is written next to its target and renamed into place, so a failure leaves nothing behind; an
    existing non-empty out_dir is refused unless force=True, and never replaced if it holds a member.
    """
    if export not in EXPORTS:
        raise BTSError(f"export '{export}' is not one of {', '.join(EXPORTS)}.")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise BTSError(f"out '{out}' already exists and is not empty (use --force to replace it).")
    provenance = getattr(model, "_bts_btx", None)
    sources = [m["path"] for m in ([provenance["seed"]] + provenance["experts"]) if m["path"]] if provenance else []
    for src in sources:  # force must never delete a member the model was built from
        if out.exists() and (Path(src).resolve() == out.resolve() or out.resolve() in Path(src).resolve().parents):
            raise BTSError(f"out '{out}' is (or contains) the member directory '{src}'; choose another out.")
    written = _as_mixtral(model) if export == "mixtral" else model
    return write_model_dir(written, out, tokenizer_from=tokenizer_from or getattr(model, "_bts_tokenizer_dir", None),
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
        model = build_btx(seed, experts, routing=self.routing, seed_rng=run.recipe.seed, device=run.device)
        trainable = btx_trainable_parameters(model, run.recipe.baselines.btx_trainable)
        counts = btx_parameter_counts(model)
        result = train_on_stitch_mix(run, self.name, model, trainable, self.budget(run.recipe),
                                     step_hook=functools.partial(set_btx_step, model))
        if distributed.is_main():
            save_btx(model, run.model_dir(self.name), force=True, tokenizer_from=seed)
        return {**result, "trainable_params": counts["trainable"], "total_params": counts["total"],
                "active_params": counts["active"]}

    def load(self, path, info: dict, device=None, dtype=None):
        return load_btx(path, dtype, device), {k: info[k] for k in ("trainable_params", "total_params", "active_params")}


BASELINES = tuple(BTXBaseline(f"btx_{routing}", routing) for routing in ROUTINGS)  # top2, sampled_top1, soft
