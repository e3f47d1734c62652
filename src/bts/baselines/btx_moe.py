"""The BTX model itself (model type "bts_btx"): the seed's own architecture, any family, with every decoder layer's
FFN replaced by an upcycled-FFN mixture of experts. bts.baselines.btx builds, saves and loads it.

    config = BTXConfig(base_config=seed.config.to_dict(), num_local_experts=3, bts_routing="top2")
    model = BTXForCausalLM(config)          # AutoModel.from_config(base) with layer.mlp -> BTXMoeBlock
    AutoModelForCausalLM.from_pretrained("btx/")        # after `import bts.baselines.btx` (no trust_remote_code)

The body (embeddings, attention, norms, rotary) is the family's own transformers model built from `base_config`;
only `layer.mlp` changes. Each MoE block holds a router (`mlp.gate`, [E, d]) and the experts (`mlp.experts`):

- gated FFNs of the known families (down(act(gate x) * up x): Llama, Mistral, Qwen2/3, Gemma 1-3, OLMo-2, Granite,
  and Phi-3's fused gate_up_proj) are stored as Mixtral stores them, `experts.gate_up_proj` [E, 2F, d] (gate
  first) and `experts.down_proj` [E, d, F], with the family's own activation; the computation is Mixtral's expert
  loop, op for op, so a Llama BTX is the Mixtral one bit for bit and exports to a stock Mixtral checkpoint.
- any other FFN (biases, another form) becomes `experts.<e>`, E copies of the family's own FFN module.

Routing (`bts_routing`): "top2" (softmax over all, keep the two largest, renormalise), "soft" (every expert, softmax
weights), "sampled_top1" (training: Gumbel-softmax soft sample y = softmax((logits + G) / tau) picks the expert that
alone runs, scaled by its y; inference: argmax with weight 1; layer 0 always routes softly, as in the paper). Scores
are computed in torch.promote_types(dtype, float32). The training loss adds alpha = router_aux_loss_coef times BTX's
load balancing (see load_balancing_loss).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from bts.core import hf
from bts.core.config import CompositeConfig
from bts.errors import BTSError

ROUTINGS = ("top2", "sampled_top1", "soft")
ALPHA = 0.01  # BTX's load-balancing coefficient
GUMBEL_RATE = 1e-4
GUMBEL_MIN_TAU = 0.5
# Families whose FFN is down(act(gate(x)) * up(x)) without biases (gate_proj/up_proj/down_proj, or Phi-3's fused
# gate_up_proj): their experts are stored in Mixtral's fused layout.
GATED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite")


def gumbel_temperature(step: int) -> float:
    """BTX sample-top-1 temperature tau = max(0.5, exp(-r * t)), r = 1e-4, t = training step."""
    return max(GUMBEL_MIN_TAU, math.exp(-GUMBEL_RATE * step))


# ---- config ---------------------------------------------------------------------------------------------------------
@strict
class BTXConfig(CompositeConfig):
    """The seed's config (`base_config`), the number of experts per layer and the routing; the derived fields
    (num_hidden_layers, layer_types, ...) are the base's, so generate's KV cache is the dense model's."""

    model_type = "bts_btx"

    num_local_experts: int = 2
    num_experts_per_tok: int = 2
    bts_routing: str = "top2"
    router_aux_loss_coef: float = ALPHA
    output_router_logits: bool = True
    sliding_window: int | None = None

    def fill_defaults(self) -> None:
        base = self.base_config
        self.tie_word_embeddings = bool(getattr(base, "tie_word_embeddings", False))
        self.sliding_window = getattr(base, "sliding_window", None)
        if self.bts_routing not in ROUTINGS:
            raise BTSError(f"routing '{self.bts_routing}' is not one of {', '.join(ROUTINGS)}.")
        self.num_experts_per_tok = {"top2": 2, "sampled_top1": 1, "soft": self.num_local_experts}[self.bts_routing]

    def cache_copies(self) -> int:
        return 1  # one body: the KV cache is the dense model's


# ---- routing ----------------------------------------------------------------------------------------------------
class BTXRouter(nn.Module):
    """A linear router [E, d] with BTX's routing variants; records what the load-balancing loss needs. Returns
    (logits, weights [T, k], expert indices [T, k]) as Mixtral's router does."""

    def __init__(self, config: BTXConfig, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.base_config.hidden_size
        self.routing = config.bts_routing
        self.layer_idx = layer_idx
        self.top_k = config.num_experts_per_tok
        if self.routing == "soft" or (self.routing == "sampled_top1" and layer_idx == 0):
            self.top_k = self.num_experts  # every expert, softmax weights
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        self.step = 0  # training step, for the Gumbel temperature (set_btx_step)
        self.routed: tuple[torch.Tensor, torch.Tensor] | None = None  # (dense g [T, E], probs [T, E]), training
        self.logits: torch.Tensor | None = None  # of the last forward, for output_router_logits

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
        self.logits = logits
        return logits, weights, index


def _dispatch(hidden_states, top_k_index, top_k_weights, num_experts, run_expert):
    """Mixtral's expert loop: each hit expert runs on its tokens, scaled by their weights, added in expert order."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        out = run_expert(expert_idx, hidden_states[token_idx])
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


class FusedExperts(nn.Module):
    """E gated FFNs in Mixtral's layout: gate_up_proj [E, 2F, d] (gate rows first), down_proj [E, d, F]."""

    def __init__(self, dense_mlp: nn.Module, num_experts: int):
        super().__init__()
        gate_up, down = gated_weights(dense_mlp)
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, *gate_up.shape, dtype=gate_up.dtype,
                                                     device=gate_up.device))
        self.down_proj = nn.Parameter(torch.empty(num_experts, *down.shape, dtype=down.dtype, device=down.device))
        self.act_fn = copy.deepcopy(getattr(dense_mlp, "act_fn", None) or dense_mlp.activation_fn)

    def _run(self, e, x):
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[e])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return _dispatch(hidden_states, top_k_index, top_k_weights, self.num_experts, self._run)

    @torch.no_grad()
    def load_members(self, mlps: list[nn.Module]) -> None:
        for e, mlp in enumerate(mlps):
            gate_up, down = gated_weights(mlp)
            self.gate_up_proj[e].copy_(gate_up)
            self.down_proj[e].copy_(down)


class ModuleExperts(nn.ModuleList):
    """E copies of the family's own FFN module, whatever its form."""

    def __init__(self, dense_mlp: nn.Module, num_experts: int):
        super().__init__(copy.deepcopy(dense_mlp) for _ in range(num_experts))
        self.num_experts = num_experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return _dispatch(hidden_states, top_k_index, top_k_weights, self.num_experts,
                         lambda e, x: self[int(e)](x))

    @torch.no_grad()
    def load_members(self, mlps: list[nn.Module]) -> None:
        for expert, mlp in zip(self, mlps):
            expert.load_state_dict(mlp.state_dict())


def gated_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """([gate; up] [2F, d], down [d, F]) of a gated FFN."""
    if hasattr(mlp, "gate_up_proj"):
        return mlp.gate_up_proj.weight, mlp.down_proj.weight
    return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0), mlp.down_proj.weight


def _is_gated(model_type: str, mlp: nn.Module) -> bool:
    linears = [getattr(mlp, n, None) for n in ("gate_up_proj", "down_proj")] if hasattr(mlp, "gate_up_proj") else \
        [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return (model_type in GATED_FAMILIES and all(isinstance(m, nn.Linear) and m.bias is None for m in linears)
            and (hasattr(mlp, "act_fn") or hasattr(mlp, "activation_fn")))


class BTXMoeBlock(nn.Module):
    """Router + experts in place of one decoder layer's FFN."""

    def __init__(self, config: BTXConfig, dense_mlp: nn.Module, layer_idx: int):
        super().__init__()
        self.gate = BTXRouter(config, layer_idx)
        kind = FusedExperts if _is_gated(config.base_config.model_type, dense_mlp) else ModuleExperts
        self.experts = kind(dense_mlp, config.num_local_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        hidden_states = hidden_states.view(-1, width)
        _, weights, index = self.gate(hidden_states)
        return self.experts(hidden_states, index, weights).reshape(batch, length, width)


# ---- load balancing -------------------------------------------------------------------------------------------------
def load_balancing_loss(routed: list[tuple[torch.Tensor, torch.Tensor]], attention_mask=None) -> torch.Tensor:
    """Sum over layers of N * sum_i u_i * p_i (BTX), u_i the mean routing weight of expert i (zero where it was not
    picked), p_i the mean softmax probability; padding positions excluded when a 2-D mask is given. Under torchrun
    the batch means u and p are taken over the global batch, so the loss and its gradient equal the one-process
    run's. (transformers' Switch-style load_balancing_loss_func counts hard top-k picks, so under soft routing it is
    the constant N; it is not used.)"""
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


# ---- the model ------------------------------------------------------------------------------------------------------
class BTXForCausalLM(PreTrainedModel, GenerationMixin):
    """The seed family's model with MoE FFNs; the training loss carries BTX's load balancing."""

    config_class = BTXConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BTXConfig):
        super().__init__(config)
        base = config.base_config
        self.model = AutoModel.from_config(base, attn_implementation=config._attn_implementation)
        self.vocab_size = base.vocab_size
        self.lm_head = nn.Linear(base.hidden_size, base.vocab_size, bias=False)
        for i, layer in enumerate(self.model.layers):
            layer.mlp = BTXMoeBlock(config, layer.mlp, i)
        self.post_init()

    def _init_weights(self, module):
        std = getattr(self.config.base_config, "initializer_range", 0.02)
        if isinstance(module, BTXRouter):
            nn.init.normal_(module.weight, std=std)  # overwritten by build_btx / from_pretrained
        elif isinstance(module, FusedExperts):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
        elif module is not self and hasattr(self, "model"):
            self.model._init_weights(module)  # the family's own initialisation

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def routers(self) -> list[BTXRouter]:
        return [layer.mlp.gate for layer in self.model.layers]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, output_router_logits=None, return_dict=None, **kwargs):
        want_logits = self.config.output_router_logits if output_router_logits is None else output_router_logits
        cache = hf.cache_from_kwargs(kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **{hf.CACHE_KWARG: cache}, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = family_head(self.config.base_config, self.lm_head(hidden[:, keep, :]))
        routers = self.routers()
        routed = [r.routed for r in routers if r.routed is not None]  # recorded in training mode only
        router_logits = tuple(r.logits for r in routers) if want_logits else None
        for r in routers:
            r.routed = r.logits = None  # drop the graph references as soon as they are used
        aux = load_balancing_loss(routed, attention_mask) if self.training and routed else None
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux
        result = MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits, hidden_states=out.hidden_states,
                                           attentions=out.attentions, router_logits=router_logits,
                                           **{hf.CACHE_KWARG: hf.output_cache(out)})
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()


def family_head(base, logits: torch.Tensor) -> torch.Tensor:
    """What the family's *ForCausalLM does to lm_head's output: Granite's logits_scaling, Gemma 2/3's softcap."""
    scaling = getattr(base, "logits_scaling", None)
    if scaling is not None:
        logits = logits / scaling
    cap = getattr(base, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def set_btx_step(model: nn.Module, step: int) -> None:
    """Tell every BTX router the training step (drives the sample-top-1 Gumbel temperature); use as step_hook."""
    if step < 0:
        raise BTSError(f"step must be >= 0 (got {step}).")
    for module in model.modules():
        if isinstance(module, BTXRouter):
            module.step = step


AutoConfig.register("bts_btx", BTXConfig)
AutoModelForCausalLM.register(BTXConfig, BTXForCausalLM)
