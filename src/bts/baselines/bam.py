"""BAM (Branch-Attend-Mix, Zhang et al., arXiv 2408.08274) and the BTS paper's BAM adapters, as one HF model, on
every family bts supports (docs/bam.md has the layout, the choices and the measurements).

    model = build_bam(seed, [code, math])                          # seed + 2 experts -> M = 3 experts per mixture
    model = build_bam(seed, [code, math], adapters=True)           # members frozen, d x d adapters + routers train
    trainable = bam_trainable_parameters(model)                    # BAM: everything; adapters: routers + adapters
    model.save_pretrained("bam/");  AutoModelForCausalLM.from_pretrained("bam/")   # after importing this module

Per decoder block i, with the M members [seed, *experts] in that order:
- attention experts: member m's own attention module (the family's class, its weights: Q, K, V, O, biases, q/k
  norms, softcaps, sliding window, partial rotary all inside it), with member m's rotary embedding and, where the
  family has one, the norm on its output (Gemma 2 / 3, OLMo 2). kv_sharing=True: expert 0's K/V modules hold the
  members' average and every expert calls them (families with separate k_proj / v_proj; phi3's fused qkv refused).
- FFN experts: member m's own MLP module (SwiGLU, GeGLU, fused gate_up: whatever the family's is) and output norm.
- routing: soft, as the BTS paper's BAM baseline: g = softmax(R x_n) over all M experts (R: d -> M, no bias, fp32
  softmax), one router for the attention mixture and one for the FFN mixture; every expert runs. Routers are drawn
  from N(0, router_init_std^2) (default: the seed's initializer_range) with a generator seeded by seed_rng.
- everything else (embeddings, final norm, the norms before attention / FFN, LM head) is the members' average.

Block forms (config.parallel), r = Granite's residual multiplier (1 elsewhere), pre_a / pre_f the norms before the
attention / FFN where the family has them (identity otherwise), post_m member m's output norm where it has one:
- parallel (default, as BAM): n = pre_a(x); y = x + r (sum_m g^a_m A^a_m(post_m(Attn_m(n))) + sum_m g^f_m A^f_m(
  post_m(FFN_m(n)))). pre_f is dropped (it was learnt on x + attention, which a parallel block never forms).
- sequential: h = x + r sum_m g^a_m A^a_m(post_m(Attn_m(pre_a(x)))); y = h + r sum_m g^f_m A^f_m(post_m(FFN_m(
  pre_f(h)))). With identical members (and identity adapters) this is exactly the dense model they came from.
A^._m is the adapter (adapters mode only; absent otherwise): bias-free d x d, initialised to the identity.
Routers read the normed input their mixture reads. In adapters mode only routers and adapters train.

KV cache: one transformers DynamicCache, slot m*L + i for expert m of block i (each expert's own keys and values, a
sliding-window layer where its block slides), so generate(), beam search and cropping work unchanged.

Parameter counts: bam_parameter_counts counts a model; bam_counts_of counts one built on the meta device from a
config alone; bts.core.plan.bam_counts is the closed form for Llama-style members (the paper's Table 2).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init

from bts.baselines.bam_layers import ROPE_FIELDS, BAMConfig, BAMDecoder, Mixture, Router
from bts.baselines.base import Baseline, accounting, positive, run_members, train_on_stitch_mix, write_model_dir
from bts.core import hf
from bts.core.device import load_kwargs, on_device
from bts.core.members import Member, check_compatible, copy_tokenizer, load_causal_lm
from bts.core.plan import bam_counts
from bts.errors import BTSError

# Config fields that change the computation without changing a tensor shape: members must agree on them.
# Rotary settings (ROPE_FIELDS) may differ: each attention expert runs with its member's own rotary embedding.
SAME_FIELDS = ("hidden_act", "rms_norm_eps", "tie_word_embeddings", "sliding_window", "head_dim", "layer_types",
               "attn_logit_softcapping", "query_pre_attn_scalar", "attention_multiplier", "residual_multiplier",
               "embedding_multiplier", "logits_scaling", "final_logit_softcapping", "use_bidirectional_attention")
__all__ = ["BAMConfig", "BAMForCausalLM", "BASELINES", "bam_counts", "bam_counts_of", "bam_parameter_counts",
           "bam_trainable_parameters", "build_bam", "load_bam"]


class BAMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BAMConfig
    base_model_prefix = "bam"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["BAMBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BAMConfig):
        super().__init__(config)
        shell = hf.family_shell(config.base_config, config._attn_implementation)
        self._family_init = shell._init_weights  # the family's own initialisation
        # the experts' attention kernels: the one asked for, or the family's default where it refuses it
        config._attn_implementation = config.base_config._attn_implementation = shell.config._attn_implementation
        self.loss_type = "ForCausalLM"
        self.model = BAMDecoder(config)
        self.lm_head = nn.Linear(config.base_config.hidden_size, config.base_config.vocab_size, bias=False)
        self.post_init()
        set_trainable(self)

    def _init_weights(self, module):
        if isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=self.config.router_init_std)
        elif isinstance(module, Mixture):
            if module.adapter is not None:
                eye = torch.eye(module.adapter.shape[-1], dtype=module.adapter.dtype, device=module.adapter.device)
                init.copy_(module.adapter, eye.expand_as(module.adapter))
        elif module is not self and hasattr(self, "_family_init"):
            self._family_init(module)  # the family's own initialisation (norms, embedding scale, rotary buffers)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def routers(self) -> list[Router]:
        return [r for block in self.model.layers for r in (block.attn_router, block.ffn_router)]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, return_routing: bool = False, **kwargs):
        """embed -> BAM blocks -> the averaged final norm and LM head (with the family's embedding multiplier,
        logit scaling and softcapping). return_routing: also every mixture's routing weights, a list of [B, T, M]
        (block 0 attention, block 0 FFN, block 1 attention, ...)."""
        cache = hf.cache_from_kwargs(kwargs)
        if use_cache and cache is None:
            cache = hf.new_cache(self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BAMForCausalLM needs exactly one of input_ids and inputs_embeds.")
        base, L = self.config.base_config, self.config.base_config.num_hidden_layers
        if inputs_embeds is None:
            inputs_embeds = hf.scale_embeddings(base, self.model.embed_tokens(input_ids))
        hf.prepare_cache(cache, [(m * L, c) for m, c in enumerate(self.model.member_configs)])
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past
        masks = hf.build_masks(base, inputs_embeds, attention_mask, cache, position_ids, first_slot=0)
        ropes = self.model.position_embeddings(inputs_embeds, position_ids)
        record = [] if return_routing else None
        hidden = inputs_embeds
        for block, kind in zip(self.model.layers, hf.layer_types(base)):
            hidden = block(hidden, [rope[kind] for rope in ropes], masks[kind], position_ids, cache, L, record)
        hidden = self.model.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = hf.scale_logits(base, self.lm_head(hidden))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=base.vocab_size, **kwargs)
        out = hf.causal_lm_output(loss, logits, cache)
        if return_routing:
            out["routing"] = record
        return out

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The standard HF folder (config.json + model.safetensors), plus the seed's tokenizer files."""
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_tokenizer(getattr(self, "_bts_tokenizer_dir", None), Path(save_directory))

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        set_trainable(model)
        return model


def set_trainable(model: BAMForCausalLM) -> None:
    """BAM trains everything; BAM adapters only the routers and adapters (the members' weights stay frozen)."""
    for name, p in model.named_parameters():
        p.requires_grad_(not model.config.adapters or name.endswith(("_router.weight", ".adapter")))


# ---- building -----------------------------------------------------------------------------------------------------
def _check_members(members: list[Member]) -> None:
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


def _avg(tensors, dtype):
    """The mean in at least fp32 (fp64 members: in fp64)."""
    return torch.stack([t.detach().to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]).mean(0).to(dtype)


def _put_avg(state: dict, prefix: str, modules: list[nn.Module], dtype, skip=()) -> None:
    """state[prefix + key] = the fp32 average over `modules` of each state-dict entry (keys under `skip` left out)."""
    dicts = [mod.state_dict() for mod in modules]
    for key in dicts[0]:
        if not key.startswith(skip):
            state[prefix + key] = _avg([sd[key] for sd in dicts], dtype)


def _put(state: dict, prefix: str, module: nn.Module, dtype, skip=()) -> None:
    for key, value in module.state_dict().items():
        if not key.startswith(skip):
            state[prefix + key] = value.detach().to(dtype)


def bam_state_dict(models: list[nn.Module], config: BAMConfig, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """The BAM weights of the members (seed first): each member's attention, MLP and output norms as its experts
    (K/V averaged into expert 0 under kv_sharing), the rest averaged in fp32, routers random, adapters identity."""
    base = config.base_config
    decs = [hf.decoder_of(m) for m in models]
    M, d, norms = len(models), base.hidden_size, hf.block_norms(base)
    state = {}
    _put_avg(state, "model.embed_tokens.", [dec.embed_tokens for dec in decs], dtype)
    _put_avg(state, "model.norm.", [dec.norm for dec in decs], dtype)
    _put_avg(state, "lm_head.", [m.lm_head for m in models], dtype)
    for i in range(base.num_hidden_layers):
        layers, pre = [dec.layers[i] for dec in decs], f"model.layers.{i}."
        if "attn_in" in norms:
            _put_avg(state, pre + "attn_norm.", [getattr(lay, norms["attn_in"]) for lay in layers], dtype)
        if "ffn_in" in norms and not config.parallel:
            _put_avg(state, pre + "ffn_norm.", [getattr(lay, norms["ffn_in"]) for lay in layers], dtype)
        attns = [hf.attention_of(lay) for lay in layers]
        shared = tuple(f"{name}." for name in hf.kv_parts(attns[0])) if config.kv_sharing else ()
        for name in shared:
            _put_avg(state, pre + f"attn.experts.0.{name}", [getattr(a, name[:-1]) for a in attns], dtype)
        for m, (lay, attn) in enumerate(zip(layers, attns)):
            _put(state, pre + f"attn.experts.{m}.", attn, dtype, skip=shared)
            _put(state, pre + f"mlp.experts.{m}.", hf.mlp_of(lay), dtype)
            for role, part in (("attn_out", "attn"), ("ffn_out", "mlp")):
                if role in norms:
                    _put(state, pre + f"{part}.post_norms.{m}.", getattr(lay, norms[role]), dtype)
        for router in ("attn_router", "ffn_router"):
            state[pre + f"{router}.weight"] = (torch.randn(M, d, generator=gen) * config.router_init_std).to(dtype)
        if config.adapters:
            for part in ("attn", "mlp"):
                state[pre + f"{part}.adapter"] = torch.eye(d, dtype=dtype).expand(M, d, d).clone()
    return state


def _member_rope(members: list[Member]) -> list | None:
    """Per member, its rotary settings where they differ from the seed's (None when every member has the seed's)."""
    seed = members[0].model.config
    rope = [{f: getattr(m.model.config, f, None) for f in ROPE_FIELDS
             if getattr(m.model.config, f, None) != getattr(seed, f, None)} or None for m in members]
    return rope if any(rope) else None


def build_bam(seed, experts, *, adapters: bool = False, parallel: bool = True, kv_sharing: bool = False,
              seed_rng: int = 0, dtype: torch.dtype | None = None,
              router_init_std: float | None = None,
              device: torch.device | str | None = None) -> BAMForCausalLM:
    """Mix a seed and its branched experts (HF dirs, cached hub ids or loaded *ForCausalLM) into one untrained BAM.

    The experts of every mixture are [seed, *experts], in that order. The members are only read (their weights are
    copied), so they stay as they were. dtype: the model's dtype (default: the seed's). Attention runs with the
    seed's attention implementation (eager, sdpa, ...)."""
    if isinstance(experts, (str, os.PathLike, nn.Module)):
        experts = [experts]
    seed_member = Member("seed", *load_causal_lm(seed, "seed", device=device))
    members = [seed_member] + [Member(f"expert{i + 1}", *load_causal_lm(spec, f"expert {i + 1}", device=device))
                               for i, spec in enumerate(experts)]
    check_compatible(seed_member, members[1:])
    _check_members(members)
    if router_init_std is not None and not router_init_std > 0:
        raise BTSError(f"router_init_std must be > 0 (got {router_init_std}).")
    base = seed_member.model.config
    if kv_sharing:
        hf.kv_parts(hf.attention_of(hf.decoder_of(seed_member.model).layers[0]))  # refuses fused projections
    config = BAMConfig(base_config=base.to_dict(), members=[{"name": m.name, "path": m.path} for m in members],
                       adapters=adapters, parallel=parallel, kv_sharing=kv_sharing, router_init_std=router_init_std,
                       member_rope=_member_rope(members), bos_token_id=base.bos_token_id,
                       eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id)
    config._attn_implementation = base._attn_implementation
    dtype = dtype or next(seed_member.model.parameters()).dtype
    state = bam_state_dict([m.model for m in members], config, dtype, torch.Generator().manual_seed(seed_rng))
    with on_device(device):  # built where it will train (device: default the CPU), never copied there
        model = BAMForCausalLM(config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise BTSError(f"members do not map onto BAM (missing {sorted(missing)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]}).")
    model._bts_tokenizer_dir = seed_member.path
    return model.eval()


# ---- training and accounting --------------------------------------------------------------------------------------
def bam_trainable_parameters(model: BAMForCausalLM) -> dict[str, nn.Parameter]:
    """Set requires_grad (BAM: everything; BAM adapters: routers and adapters) and return the trainables by name."""
    set_trainable(model)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def bam_parameter_counts(model: BAMForCausalLM) -> dict[str, int]:
    """Total, trainable and active-per-token parameters of a model (tied weights counted once; soft routing runs
    every expert, so active = total)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "active": total}


def bam_counts_of(base, members: int, **options) -> dict[str, int]:
    """bam_parameter_counts of a BAM of `members` members of config `base` (options: adapters, parallel,
    kv_sharing), built on the meta device (no memory): exact for every family, norms and biases included."""
    with torch.device("meta"):
        model = BAMForCausalLM(BAMConfig(base_config=base.to_dict(), num_members=members, **options))
    return bam_parameter_counts(model)


def load_bam(path, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> BAMForCausalLM:
    """A saved BAM / BAM adapters folder, in eval mode (importing this module registers the Auto classes)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise BTSError(f"BAM path '{path}' is not a model directory (no config.json).")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, **load_kwargs(device))
    if not isinstance(model, BAMForCausalLM):
        raise BTSError(f"BAM path '{path}' holds model_type '{model.config.model_type}', not bts_bam.")
    return model.eval()


# ---- the bam / bam_adapters baselines -----------------------------------------------------------------------------
class BAMBaseline(Baseline):
    """`bam` (every weight trains, at baselines.bam_lr) and `bam_adapters` (members frozen; routers and adapters
    train, at baselines.bam_adapters_lr): seed + experts as the attention and FFN experts, trained on the stitch
    datamix for the stitch's steps and batch size (the same token budget as BTS and BTX). baselines.bam_parallel
    picks the block form (default: BAM's parallel block; docs/bam.md has the measurement)."""

    options = ("bam_lr", "bam_adapters_lr", "bam_parallel")
    trained = True

    def __init__(self, name: str, adapters: bool):
        super().__init__(name)
        self.adapters = adapters
        self.lr_key = "bam_adapters_lr" if adapters else "bam_lr"

    def check(self, options, prefix: str = "baselines.") -> None:
        positive(getattr(options, self.lr_key), f"{prefix}{self.lr_key}")
        if not isinstance(options.bam_parallel, bool):
            raise BTSError(f"{prefix}bam_parallel must be true or false (got {options.bam_parallel!r}).")

    def budget(self, recipe):  # the stitch's steps and batch
        return dataclasses.replace(recipe.stitch.train, lr=getattr(recipe.baselines, self.lr_key))

    def build(self, run) -> dict:
        from bts.train import distributed

        seed, experts = run_members(run)
        model = build_bam(seed, experts, adapters=self.adapters, parallel=run.recipe.baselines.bam_parallel,
                          seed_rng=run.recipe.seed, device=run.device)
        trainable = bam_trainable_parameters(model)
        counts = bam_parameter_counts(model)
        result = train_on_stitch_mix(run, self.name, model, trainable, self.budget(run.recipe))
        if distributed.is_main():
            write_model_dir(model, run.model_dir(self.name), tokenizer_from=seed)
        return {**result, **accounting(counts)}

    def load(self, path, info: dict, device=None, dtype=None):
        return load_bam(path, dtype, device), {k: info[k] for k in ("trainable_params", "total_params", "active_params")}


BASELINES = (BAMBaseline("bam", adapters=False), BAMBaseline("bam_adapters", adapters=True))


AutoConfig.register("bts_bam", BAMConfig)
AutoModelForCausalLM.register(BAMConfig, BAMForCausalLM)
