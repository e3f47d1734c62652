"""The blocks of BAM (bts.baselines.bam, whose docstring describes the layout): per decoder block, M attention experts
and M FFN experts that are the members' own attention and MLP modules (built by the family's code, through
bts.core.hf), soft routers, optional per-expert d x d adapters, and one block that mixes them (parallel or
sequential) with the family's own norms and residual structure; and BAMConfig, the model's config."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn

from bts.core import hf
from bts.core.config import CompositeConfig

ROPE_FIELDS = ("rope_parameters", "max_position_embeddings")  # may differ between members: each keeps its own


@strict
class BAMConfig(CompositeConfig):
    """A BAM model: `base_config` is the members' architecture (the seed's config), `members` records where they
    came from ([{"name", "path"}], seed first; provenance only: the folder holds every weight). `member_rope` holds,
    per member, its ROPE_FIELDS where they differ from the seed's (None: the seed's)."""

    model_type = "bts_bam"

    num_members: int = 2
    adapters: bool = False
    parallel: bool = True
    kv_sharing: bool = False
    router_init_std: float | None = None
    member_rope: list | None = None

    def fill_defaults(self) -> None:
        base = self.base_config
        if self.members is not None:
            self.num_members = len(self.members)
        self.tie_word_embeddings = bool(getattr(base, "tie_word_embeddings", False))
        if self.router_init_std is None:
            self.router_init_std = float(getattr(base, "initializer_range", 0.02))

    def cache_copies(self) -> int:
        return self.num_members  # one cache slot per (member, block): every attention expert keeps its own K/V

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # generate()'s cache starts with plain layers; the model gives each expert's slots its kind (hf.prepare_cache)
        self.layer_types = ["full_attention"] * self.num_hidden_layers

    def member_configs(self) -> list:
        """Member m's config: the seed's, with member m's rotary settings (one object per distinct setting)."""
        base, out, seen = self.base_config, [], {}
        for m in range(self.num_members):
            rope = (self.member_rope or [None] * self.num_members)[m]
            key = repr(sorted(rope.items())) if rope else None
            if key not in seen:
                config = base
                if rope:
                    config = copy.deepcopy(base)
                    for field, value in rope.items():
                        setattr(config, field, value)
                seen[key] = config
            out.append(seen[key])
        return out


def _compute_dtype(x):
    """At least fp32 (fp64 in an fp64 model): routing never computes in less, nor drops an fp64 model to fp32."""
    return torch.promote_types(x.dtype, torch.float32)


def _proj(x, w):
    """x [M, B, T, in], w [M, out, in] (nn.Linear layout) -> [M, B, T, out]."""
    return torch.matmul(x, w.unsqueeze(1).transpose(-1, -2))


class Borrowed(nn.Module):
    """Calls a module owned by another expert without owning its parameters (kv_sharing: one K/V per block)."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: its parameters are saved and counted once

    def forward(self, *args, **kwargs):
        return self.owner(*args, **kwargs)


class Mixture(nn.Module):
    """M experts of one kind, each a member's own module, with the member's norm on the expert's output where its
    block has one (Gemma 2 / 3, OLMo 2), and optional per-expert d x d adapters on the outputs."""

    def __init__(self, experts: list[nn.Module], post_norms: list[nn.Module] | None, adapters: bool, d: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.post_norms = nn.ModuleList(post_norms) if post_norms else None
        self.adapter = nn.Parameter(torch.empty(len(experts), d, d)) if adapters else None

    def _finish(self, outputs: list) -> torch.Tensor:  # -> [M, B, T, d]
        if self.post_norms is not None:
            outputs = [norm(y) for norm, y in zip(self.post_norms, outputs)]
        y = torch.stack(outputs)
        return y if self.adapter is None else _proj(y, self.adapter)


class AttentionExperts(Mixture):
    """Expert m is member m's attention; it keeps its K/V in cache slots m*L .. m*L + L - 1 (its layer_idx is the
    block's index). kv_sharing: expert 0's K/V modules (the members' average) serve every expert."""

    def __init__(self, experts, post_norms, adapters: bool, d: int, kv_sharing: bool):
        super().__init__(experts, post_norms, adapters, d)
        if kv_sharing:
            for name in hf.kv_parts(experts[0]):
                for expert in experts[1:]:
                    setattr(expert, name, Borrowed(getattr(experts[0], name)))

    def forward(self, x, ropes, mask, position_ids, cache, num_layers: int):
        return self._finish([
            hf.call_attention(attn, x, mask=mask, position_embeddings=rope, position_ids=position_ids,
                              cache=hf.member_cache(cache, m * num_layers))
            for m, (attn, rope) in enumerate(zip(self.experts, ropes))])


class FFNExperts(Mixture):
    def forward(self, x):
        return self._finish([mlp(x) for mlp in self.experts])


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
    """One decoder block. Shared (the members' average): the norm before the attention (`attn_norm`, where the
    family has one) and, sequential only, the one before the FFN (`ffn_norm`). Per expert: the members' own
    attention / MLP and the norms on their outputs. Granite's residual multiplier scales both mixtures."""

    def __init__(self, config: BAMConfig, layer_idx: int, member_configs: list):
        super().__init__()
        base, M, d = config.base_config, config.num_members, config.base_config.hidden_size
        layers = [hf.new_decoder_layer(c, layer_idx) for c in member_configs]
        norms = hf.block_norms(base)
        self.parallel, self.scale = config.parallel, hf.residual_multiplier(base)
        self.attn_norm = getattr(layers[0], norms["attn_in"]) if "attn_in" in norms else None
        keep_ffn_norm = "ffn_in" in norms and not self.parallel
        self.ffn_norm = getattr(layers[0], norms["ffn_in"]) if keep_ffn_norm else None
        self.attn_router = Router(d, M, bias=False)
        self.ffn_router = Router(d, M, bias=False)
        post = {role: [getattr(lay, norms[role]) for lay in layers] if role in norms else None
                for role in ("attn_out", "ffn_out")}
        self.attn = AttentionExperts([hf.attention_of(lay) for lay in layers], post["attn_out"], config.adapters, d,
                                     config.kv_sharing)
        self.mlp = FFNExperts([hf.mlp_of(lay) for lay in layers], post["ffn_out"], config.adapters, d)

    def forward(self, x, ropes, mask, position_ids, cache, num_layers: int, record: list | None = None):
        n = x if self.attn_norm is None else self.attn_norm(x)
        attn = mix(self.attn_router, n, self.attn(n, ropes, mask, position_ids, cache, num_layers), record)
        if self.parallel:
            return x + self.scale * (attn + mix(self.ffn_router, n, self.mlp(n), record))
        h = x + self.scale * attn
        n = h if self.ffn_norm is None else self.ffn_norm(h)
        return h + self.scale * mix(self.ffn_router, n, self.mlp(n), record)


class BAMDecoder(nn.Module):
    """The family's token embedding and final norm, the BAM blocks, and each member's rotary embedding."""

    def __init__(self, config: BAMConfig):
        super().__init__()
        base = config.base_config
        self.member_configs = config.member_configs()
        self.embed_tokens, self.norm = hf.new_embedding_and_norm(base)
        self.layers = nn.ModuleList(BAMBlock(config, i, self.member_configs) for i in range(base.num_hidden_layers))
        distinct = list({id(c): c for c in self.member_configs}.values())
        self.rotary_emb = nn.ModuleList(hf.new_rotary(c) for c in distinct)  # buffers only, one per distinct rope
        self._rope_of = [next(j for j, c in enumerate(distinct) if c is mc) for mc in self.member_configs]

    def position_embeddings(self, hidden, position_ids) -> list[dict]:
        """Per member: its rotary embedding's (cos, sin) keyed by layer type (each distinct setting computed once)."""
        distinct = [hf.rotaries_of(rot, self.member_configs[self._rope_of.index(j)], hidden, position_ids)
                    for j, rot in enumerate(self.rotary_emb)]
        return [distinct[j] for j in self._rope_of]
