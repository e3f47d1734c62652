"""The blocks of BAM (bts.baselines.bam, whose docstring describes the layout): M attention experts and M SwiGLU FFN
experts stacked along a leading expert axis, soft routers, optional per-expert d x d adapters, and one block that
mixes them (parallel or sequential); and BAMConfig, the model's config."""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from bts.core import hf
from bts.core.config import CompositeConfig
from bts.errors import BTSError

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


def _compute_dtype(x):
    """At least fp32 (fp64 in an fp64 model): norms and routing never compute in less, nor drop an fp64 model to fp32."""
    return torch.promote_types(x.dtype, torch.float32)


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
    x = x.to(_compute_dtype(x))
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
    """A soft router d -> M (bias-free): forward gives the routing weights softmax(R x) [B, T, M], computed in at
    least fp32 (fp64 in fp64 models). Its own class so weight init can tell it from the LM head."""

    def forward(self, x):
        dtype = _compute_dtype(x)
        return F.linear(x.to(dtype), self.weight.to(dtype)).softmax(dim=-1)


def mix(router: Router, x_normed, outputs, record: list | None):
    """Soft routing: sum_m softmax(R x)_m * outputs[m]; the weights [B, T, M] are appended to `record`."""
    weights = router(x_normed)  # a module call: hooks (FSDP2, the float64 checks) see it
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
