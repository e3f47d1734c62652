"""BAM (Branch-Attend-Mix, Zhang et al., arXiv 2408.08274) and the BTS paper's BAM adapters, as one HF model.

    model = build_bam(seed, [code, math])                          # seed + 2 experts -> M = 3 experts per mixture
    model = build_bam(seed, [code, math], adapters=True)           # members frozen, d x d adapters + routers train
    trainable = bam_trainable_parameters(model)                    # BAM: everything; adapters: routers + adapters
    model.save_pretrained("bam/");  AutoModelForCausalLM.from_pretrained("bam/")   # after importing this module

Per decoder block i, with the M members [seed, *experts] in that order:
- attention experts: member m's whole attention (Q, K, V, O and, where the family has them, q/k/v biases and
  Qwen3's q/k norms) is expert m of a soft mixture of attention. kv_sharing=True keeps one K/V (weights, biases,
  k norm) per block, the average of the members', and M query/output experts (the paper's cheaper variant).
- FFN experts: member m's SwiGLU FFN is expert m, as in BTX.
- routing: soft, as the BTS paper's BAM baseline: g = softmax(R x_n) over all M experts (R: d -> M, no bias, fp32
  softmax), one router for the attention mixture and one for the FFN mixture; every expert runs. Routers are drawn
  from N(0, router_init_std^2) (default: the seed's initializer_range) with a generator seeded by seed_rng.
- everything else (embeddings, final norm, block norms, LM head) is the fp32 average of the members.

Block forms (config.parallel):
- parallel (default, as BAM): y = x + sum_m g^a_m A^a_m(Attn_m(n)) + sum_m g^f_m A^f_m(FFN_m(n)), n = ln1(x).
- sequential: h = x + sum_m g^a_m A^a_m(Attn_m(ln1(x))); y = h + sum_m g^f_m A^f_m(FFN_m(ln2(h))). With identical
  members (and identity adapters) this is exactly the dense model they came from.
A^·_m is the adapter (adapters mode only; absent otherwise).

Choices where the papers are silent:
- Parallel norm: the members have two norms per block; a parallel block normalises its input once. We use the
  averaged input_layernorm for both mixtures (and both routers) and drop post_attention_layernorm: input_layernorm is
  the norm the members learnt on the block input x, which is what both branches read here (post_attention_layernorm
  was learnt on x + attention, a distribution a parallel block never produces). One norm per block is also the
  PaLM / GPT-J parallel block that BAM adopts.
- Router input: the normed input its mixture reads (ln1(x) for attention; ln2(h) for the sequential FFN, ln1(x) for
  the parallel FFN), as Mixtral's router reads the FFN's normed input.
- Adapters: one bias-free d x d matrix per (block, member, attention|FFN), applied to that expert's output before the
  routed sum, initialised to the identity (so at init BAM adapters is BAM with frozen members). In adapters mode the
  shared weights (embeddings, norms, head: the members' average, as in BAM; the BTS paper's 9.9B total implies one
  shared copy, not four) stay frozen too: only routers and adapters train, as Table 2's 1.5B says.
- Attention runs through torch SDPA with transformers' causal / sliding-window masks (bts.core.hf.build_masks, the
  sdpa mask format); the math mirrors the family's attention (as bts.core.batched does).
- KV cache: the experts are folded into the head axis, so block i's attention is one SDPA call and the one
  DynamicCache holds, in slot i, [B, M*H_kv, S, hd] (expert m's heads m*H_kv..), or [B, H_kv, S, hd] with
  kv_sharing: every attention expert has its own cached keys and values, and generate(), beam search and cropping
  work unchanged. config.num_hidden_layers is L.

Parameter counts (bam_counts; bam_parameter_counts counts a model). With V vocab, d hidden, F SwiGLU width, L blocks,
H heads of hd dims, H_kv kv heads, M members:
  shared  = V*d * (1 if tied else 2) + d + L*d * (1 if parallel else 2)
  attn    = 2*d*H*hd + 2*d*H_kv*hd (+ q/k/v biases H*hd + 2*H_kv*hd, + q/k norms 2*hd, where present); ffn = 3*d*F
  routers = L * 2 * M * d;   adapters = L * M * 2 * d^2
  BAM total = shared + L*M*(attn + ffn) + routers            (kv_sharing: L*(M*(q+o) + (k+v)) for attention)
  BAM adapters total = BAM total + adapters;  trained = adapters + routers;  active = total (soft routing)
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from bts.core import hf
from bts.core.config import CompositeConfig
from bts.core.members import Member, check_compatible, copy_tokenizer, load_causal_lm
from bts.errors import BTSError

# Config fields that change the computation without changing a tensor shape: members must agree on them.
SAME_FIELDS = ("hidden_act", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "sliding_window",
               "head_dim", "max_position_embeddings", "layer_types")
ROLES_ATTN = ("q", "k", "v", "o")


@strict
class BAMConfig(CompositeConfig):
    """A BAM model: `base_config` is the members' architecture, `members` records where they came from
    ([{"name", "path"}], seed first; provenance only: the folder holds every weight)."""

    model_type = "bts_bam"

    num_members: int = 2
    adapters: bool = False
    parallel: bool = True
    kv_sharing: bool = False
    router_init_std: float | None = None
    sliding_window: int | None = None

    def fill_defaults(self) -> None:
        base = self.base_config
        if self.members is not None:
            self.num_members = len(self.members)
        self.tie_word_embeddings = bool(getattr(base, "tie_word_embeddings", False))
        self.sliding_window = getattr(base, "sliding_window", None)
        if self.router_init_std is None:
            self.router_init_std = float(getattr(base, "initializer_range", 0.02))

    def cache_copies(self) -> int:
        return 1  # one cache slot per block: the experts are folded into its heads


def family(base) -> tuple[type, type, nn.Module, nn.Module]:
    """(RMSNorm class, rotary class, a meta-device attention probe, a meta-device MLP probe) of a Llama-family config."""
    hf.check_supported(base)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING[type(base)]
    module, prefix = importlib.import_module(causal.__module__), causal.__name__.removesuffix("ForCausalLM")
    with torch.device("meta"):
        attn, mlp = getattr(module, f"{prefix}Attention")(base, 0), getattr(module, f"{prefix}MLP")(base)
    if getattr(mlp.gate_proj, "bias", None) is not None:
        raise BTSError("BAM: members with MLP biases are not supported (SwiGLU experts have none).")
    return getattr(module, f"{prefix}RMSNorm"), getattr(module, f"{prefix}RotaryEmbedding"), attn, mlp


def _rms(x, weight, eps):
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def _proj(x, w, b=None):
    """x [B, T, in] (or [M, B, T, in]), w [M, out, in] (nn.Linear layout), b [M, out] -> [M, B, T, out]."""
    y = torch.matmul(x if x.dim() == 4 else x.unsqueeze(0), w.unsqueeze(1).transpose(-1, -2))
    return y if b is None else y + b[:, None, None, :]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Mixture(nn.Module):
    """What both expert mixtures share: M experts, optional per-expert d x d adapters on their outputs."""

    def _adapt(self, y):  # y: [M, B, T, d]
        return y if self.adapter is None else _proj(y, self.adapter)


class BAMAttention(Mixture):
    """M attention experts (stacked weights, nn.Linear layout along a leading expert axis); with kv_sharing one K/V."""

    def __init__(self, config: BAMConfig, probe: nn.Module):
        super().__init__()
        M, d = config.num_members, config.base_config.hidden_size
        self.M, self.Mk = M, 1 if config.kv_sharing else M
        self.head_dim, self.scaling = probe.head_dim, probe.scaling
        self.heads, self.kv_heads = config.base_config.num_attention_heads, config.base_config.num_key_value_heads
        self.dropout = float(getattr(config.base_config, "attention_dropout", 0.0) or 0.0)
        for role in ROLES_ATTN:
            linear, n = getattr(probe, f"{role}_proj"), self.Mk if role in "kv" else M
            self.register_parameter(f"{role}_proj", nn.Parameter(torch.empty(n, *linear.weight.shape)))
            bias = nn.Parameter(torch.empty(n, linear.bias.shape[0])) if linear.bias is not None else None
            self.register_parameter(f"{role}_bias", bias)
        qk = getattr(probe, "q_norm", None) is not None  # Qwen3: RMSNorm over each head before the rotary
        self.qk_eps = probe.q_norm.variance_epsilon if qk else None
        self.q_norm = nn.Parameter(torch.empty(M, self.head_dim)) if qk else None
        self.k_norm = nn.Parameter(torch.empty(self.Mk, self.head_dim)) if qk else None
        self.adapter = nn.Parameter(torch.empty(M, d, d)) if config.adapters else None

    def forward(self, x, position_embeddings, mask, cache, slot: int):
        """x: the normed input [B, T, d] -> every expert's output [M, B, T, d]."""
        B, T, _ = x.shape
        hd, H, Hk = self.head_dim, self.heads, self.kv_heads
        q = _proj(x, self.q_proj, self.q_bias).view(self.M, B, T, H, hd)
        k = _proj(x, self.k_proj, self.k_bias).view(self.Mk, B, T, Hk, hd)
        v = _proj(x, self.v_proj, self.v_bias).view(self.Mk, B, T, Hk, hd)
        if self.q_norm is not None:
            q = _rms(q, self.q_norm[:, None, None, None, :], self.qk_eps)
            k = _rms(k, self.k_norm[:, None, None, None, :], self.qk_eps)
        # Experts folded into heads: [M, B, T, H, hd] -> [B, M*H, T, hd]; expert m owns heads m*H .. m*H + H - 1.
        q, k, v = (t.permute(1, 0, 3, 2, 4).reshape(B, t.shape[0] * t.shape[3], T, hd) for t in (q, k, v))
        cos, sin = (e.unsqueeze(1) for e in position_embeddings)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, slot)
        if self.Mk != self.M:  # shared K/V: every query expert reads the same heads
            k, v = k.repeat(1, self.M, 1, 1), v.repeat(1, self.M, 1, 1)
        if H != Hk:  # as transformers' repeat_kv: kv head j serves query heads j*g .. j*g + g - 1
            k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
        causal = T > 1 and mask is None
        if causal and k.shape[2] > T:
            k, v = k[:, :, :T], v[:, :, :T]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scaling,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.view(B, self.M, H, T, hd).permute(1, 0, 3, 2, 4).reshape(self.M, B, T, H * hd)
        return self._adapt(_proj(out, self.o_proj, self.o_bias))


class BAMFFN(Mixture):
    """M SwiGLU experts, stacked: gate/up [M, F, d], down [M, d, F]."""

    def __init__(self, config: BAMConfig, probe: nn.Module):
        super().__init__()
        M, d = config.num_members, config.base_config.hidden_size
        for role in ("gate", "up", "down"):
            shape = getattr(probe, f"{role}_proj").weight.shape
            self.register_parameter(f"{role}_proj", nn.Parameter(torch.empty(M, *shape)))
        self.act_fn = probe.act_fn
        self.adapter = nn.Parameter(torch.empty(M, d, d)) if config.adapters else None

    def forward(self, x):
        return self._adapt(_proj(self.act_fn(_proj(x, self.gate_proj)) * _proj(x, self.up_proj), self.down_proj))


class Router(nn.Linear):
    """A soft router d -> M (bias-free); its own class so weight init can tell it from the LM head."""


def mix(router: Router, x_normed, outputs, record: list | None):
    """Soft routing: sum_m softmax(R x)_m * outputs[m]; the weights [B, T, M] are appended to `record`."""
    weights = F.linear(x_normed.float(), router.weight.float()).softmax(dim=-1)
    if record is not None:
        record.append(weights.detach())
    return (weights.permute(2, 0, 1).unsqueeze(-1).to(outputs.dtype) * outputs).sum(0)


class BAMBlock(nn.Module):
    def __init__(self, config: BAMConfig, norm_cls, attn_probe, mlp_probe):
        super().__init__()
        base, M = config.base_config, config.num_members
        self.parallel = config.parallel
        self.input_layernorm = norm_cls(base.hidden_size, eps=base.rms_norm_eps)
        if not self.parallel:
            self.post_attention_layernorm = norm_cls(base.hidden_size, eps=base.rms_norm_eps)
        self.attn_router = Router(base.hidden_size, M, bias=False)
        self.ffn_router = Router(base.hidden_size, M, bias=False)
        self.attn = BAMAttention(config, attn_probe)
        self.mlp = BAMFFN(config, mlp_probe)

    def forward(self, x, position_embeddings, mask, cache, slot: int, record: list | None = None):
        n = self.input_layernorm(x)
        attn = mix(self.attn_router, n, self.attn(n, position_embeddings, mask, cache, slot), record)
        if self.parallel:
            return x + attn + mix(self.ffn_router, n, self.mlp(n), record)
        h = x + attn
        n = self.post_attention_layernorm(h)
        return h + mix(self.ffn_router, n, self.mlp(n), record)


class BAMDecoder(nn.Module):
    def __init__(self, config: BAMConfig):
        super().__init__()
        base = config.base_config
        norm_cls, rotary_cls, attn_probe, mlp_probe = family(base)
        self.embed_tokens = nn.Embedding(base.vocab_size, base.hidden_size, getattr(base, "pad_token_id", None))
        self.layers = nn.ModuleList(BAMBlock(config, norm_cls, attn_probe, mlp_probe)
                                    for _ in range(base.num_hidden_layers))
        self.norm = norm_cls(base.hidden_size, eps=base.rms_norm_eps)
        self.rotary_emb = rotary_cls(config=base)  # the members' rotary embedding (same class and config)


class BAMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BAMConfig
    base_model_prefix = "bam"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _no_split_modules = ["BAMBlock"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BAMConfig):
        super().__init__(config)
        config.base_config._attn_implementation = "sdpa"  # masks in SDPA's format: attention runs through SDPA
        self._mask_config = mask_config(config.base_config)
        self.loss_type = "ForCausalLM"
        self.model = BAMDecoder(config)
        self.lm_head = nn.Linear(config.base_config.hidden_size, config.base_config.vocab_size, bias=False)
        self.post_init()
        set_trainable(self)

    def _init_weights(self, module):
        std = self.config.base_config.initializer_range
        if isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=self.config.router_init_std)
        elif isinstance(module, Mixture):
            for name, p in module.named_parameters(recurse=False):
                if name == "adapter":
                    init.copy_(p, torch.eye(p.shape[-1], dtype=p.dtype, device=p.device).expand_as(p))
                elif name.endswith("_norm"):
                    init.ones_(p)
                elif name.endswith("_bias"):
                    init.zeros_(p)
                else:
                    init.normal_(p, mean=0.0, std=std)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def routers(self) -> list[Router]:
        return [r for block in self.model.layers for r in (block.attn_router, block.ffn_router)]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, return_routing: bool = False, **kwargs):
        """embed -> BAM blocks -> the averaged final norm and LM head. return_routing: also every mixture's routing
        weights, a list of [B, T, M] (block 0 attention, block 0 FFN, block 1 attention, ...)."""
        cache = hf.cache_from_kwargs(kwargs)
        if use_cache and cache is None:
            cache = hf.new_cache(self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("BAMForCausalLM needs exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past
        base = self._mask_config
        masks = hf.build_masks(base, inputs_embeds, attention_mask, cache, position_ids)
        rope = hf.rotary(self.model, inputs_embeds, position_ids)
        record = [] if return_routing else None
        hidden = inputs_embeds
        for i, (block, kind) in enumerate(zip(self.model.layers, hf.layer_types(base))):
            hidden = block(hidden, rope, masks[kind], cache, i, record)
        hidden = self.model.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
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


def mask_config(base):
    """The members' config with every block's attention type spelt out: a Mistral config with sliding_window set and
    no layer_types slides in every block (as MistralModel builds its mask), which hf.layer_types would read as full."""
    config = copy.deepcopy(base)
    if getattr(config, "layer_types", None) is None and getattr(config, "sliding_window", None) is not None:
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    config._attn_implementation = "sdpa"
    return config


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
    return torch.stack([t.detach().float() for t in tensors]).mean(0).to(dtype)


def _stack(tensors, dtype):
    return torch.stack([t.detach() for t in tensors]).to(dtype)


def bam_state_dict(models: list[nn.Module], config: BAMConfig, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """The BAM weights of the members (seed first): experts stacked, K/V averaged under kv_sharing, the rest
    averaged in fp32, routers random, adapters the identity."""
    decs = [hf.decoder_of(m) for m in models]
    M, d = len(models), config.base_config.hidden_size
    state = {"model.embed_tokens.weight": _avg([dec.embed_tokens.weight for dec in decs], dtype),
             "model.norm.weight": _avg([dec.norm.weight for dec in decs], dtype),
             "lm_head.weight": _avg([m.lm_head.weight for m in models], dtype)}
    for i in range(config.base_config.num_hidden_layers):
        layers, pre = [dec.layers[i] for dec in decs], f"model.layers.{i}."
        state[pre + "input_layernorm.weight"] = _avg([lay.input_layernorm.weight for lay in layers], dtype)
        if not config.parallel:
            state[pre + "post_attention_layernorm.weight"] = _avg(
                [lay.post_attention_layernorm.weight for lay in layers], dtype)
        attns = [lay.self_attn for lay in layers]
        for role in ROLES_ATTN:
            shared = config.kv_sharing and role in "kv"
            combine = (lambda ts, dt: _avg(ts, dt).unsqueeze(0)) if shared else _stack
            state[pre + f"attn.{role}_proj"] = combine([getattr(a, f"{role}_proj").weight for a in attns], dtype)
            if getattr(attns[0], f"{role}_proj").bias is not None:
                state[pre + f"attn.{role}_bias"] = combine([getattr(a, f"{role}_proj").bias for a in attns], dtype)
        if getattr(attns[0], "q_norm", None) is not None:
            state[pre + "attn.q_norm"] = _stack([a.q_norm.weight for a in attns], dtype)
            k_norms = [a.k_norm.weight for a in attns]
            state[pre + "attn.k_norm"] = _avg(k_norms, dtype).unsqueeze(0) if config.kv_sharing else _stack(k_norms, dtype)
        for role in ("gate", "up", "down"):
            state[pre + f"mlp.{role}_proj"] = _stack([getattr(lay.mlp, f"{role}_proj").weight for lay in layers], dtype)
        for router in ("attn_router", "ffn_router"):
            state[pre + f"{router}.weight"] = (torch.randn(M, d, generator=gen) * config.router_init_std).to(dtype)
        if config.adapters:
            for part in ("attn", "mlp"):
                state[pre + f"{part}.adapter"] = torch.eye(d, dtype=dtype).expand(M, d, d).clone()
    return state


def build_bam(seed, experts, *, adapters: bool = False, parallel: bool = True, kv_sharing: bool = False,
              seed_rng: int = 0, dtype: torch.dtype | None = None,
              router_init_std: float | None = None) -> BAMForCausalLM:
    """Mix a seed and its branched experts (HF dirs, cached hub ids or loaded *ForCausalLM) into one untrained BAM.

    The experts of every mixture are [seed, *experts], in that order. The members are only read (their weights are
    copied), so they stay as they were. dtype: the model's dtype (default: the seed's)."""
    if isinstance(experts, (str, os.PathLike, nn.Module)):
        experts = [experts]
    seed_member = Member("seed", *load_causal_lm(seed, "seed"))
    members = [seed_member] + [Member(f"expert{i + 1}", *load_causal_lm(spec, f"expert {i + 1}"))
                               for i, spec in enumerate(experts)]
    check_compatible(seed_member, members[1:])
    _check_members(members)
    if router_init_std is not None and not router_init_std > 0:
        raise BTSError(f"router_init_std must be > 0 (got {router_init_std}).")
    base = seed_member.model.config
    config = BAMConfig(base_config=base.to_dict(), members=[{"name": m.name, "path": m.path} for m in members],
                       adapters=adapters, parallel=parallel, kv_sharing=kv_sharing, router_init_std=router_init_std,
                       bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id)
    dtype = dtype or next(seed_member.model.parameters()).dtype
    state = bam_state_dict([m.model for m in members], config, dtype, torch.Generator().manual_seed(seed_rng))
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


def bam_counts(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
               num_kv_heads: int, members: int, head_dim: int | None = None, tie_word_embeddings: bool = False,
               qkv_bias: bool = False, qk_norm: bool = False, adapters: bool = False, parallel: bool = True,
               kv_sharing: bool = False) -> dict[str, int]:
    """The closed form of the module docstring, from architecture numbers alone (for `bts plan`, Table 2).
    qkv_bias: q/k/v biases (Qwen2); qk_norm: per-head q/k norms (Qwen3). Returns {total, trainable, active}."""
    V, d, Fw, L, M = vocab_size, hidden_size, intermediate_size, num_layers, members
    hd = head_dim or d // num_heads
    q = o = d * num_heads * hd
    k = v = d * num_kv_heads * hd
    if qkv_bias:
        q, k, v = q + num_heads * hd, k + num_kv_heads * hd, v + num_kv_heads * hd
    if qk_norm:
        q, k = q + hd, k + hd
    shared = V * d * (1 if tie_word_embeddings else 2) + d + L * d * (1 if parallel else 2)
    attention = M * (q + o) + (1 if kv_sharing else M) * (k + v)
    routers, adapter = L * 2 * M * d, L * M * 2 * d * d if adapters else 0
    total = shared + L * (attention + M * 3 * d * Fw) + routers + adapter
    return {"total": total, "trainable": routers + adapter if adapters else total, "active": total}


def bam_counts_of(base, members: int, **options) -> dict[str, int]:
    """bam_counts for members of a Llama-family config `base` (options: adapters, parallel, kv_sharing)."""
    attn = family(base)[2]
    return bam_counts(vocab_size=base.vocab_size, hidden_size=base.hidden_size,
                      intermediate_size=base.intermediate_size, num_layers=base.num_hidden_layers,
                      num_heads=base.num_attention_heads, num_kv_heads=base.num_key_value_heads, members=members,
                      head_dim=attn.head_dim, tie_word_embeddings=bool(base.tie_word_embeddings),
                      qkv_bias=attn.q_proj.bias is not None, qk_norm=getattr(attn, "q_norm", None) is not None,
                      **options)


AutoConfig.register("bts_bam", BAMConfig)
AutoModelForCausalLM.register(BAMConfig, BAMForCausalLM)
