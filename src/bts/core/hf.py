"""The one place that touches transformers internals (pinned to 5.24; its per-layer API moves between minors).

bts runs several Hugging Face decoders block by block. That needs five things transformers does not promise to
keep stable: the decoder-layer call (5.24 renamed `past_key_values` to `cache` and dropped `cache_position`), the
causal-mask builders, the rotary-embedding call, the attention-module slot index used by the KV cache, and the
name of the cache field on model outputs. Everything of that kind lives here, so a new transformers release or a
new Llama-family architecture is a change to this file only.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from bts.errors import BTSError

# Decoder-only families whose layers share Llama's call signature and layout (model.embed_tokens, model.layers,
# model.norm, model.rotary_emb, lm_head, layer.self_attn.layer_idx). Adding one is a line here plus a test.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

CACHE_KWARG = "cache"  # 5.0-5.23: "past_key_values"


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BTSError(
            f"model_type '{config.model_type}' is not supported by bts (supported: {', '.join(SUPPORTED_MODEL_TYPES)})."
        )


def decoder_of(causal_lm: nn.Module) -> nn.Module:
    """The transformer body (embeddings, layers, final norm, rotary) of a `*ForCausalLM`."""
    return causal_lm.model


def layer_types(config) -> list[str]:
    """Attention type of each layer ("full_attention" / "sliding_attention"), as the mask dict is keyed."""
    types = getattr(config, "layer_types", None)
    return list(types) if types is not None else ["full_attention"] * config.num_hidden_layers


def build_masks(config, inputs_embeds, attention_mask, cache, position_ids) -> dict:
    """Causal masks keyed by layer type; built once and shared by every member (same positions, same shape)."""
    kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                  position_ids=position_ids)
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in layer_types(config):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def rotary(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor):
    return decoder.rotary_emb(hidden, position_ids)


def call_layer(layer, hidden, *, mask, position_embeddings, position_ids, cache, use_cache) -> torch.Tensor:
    out = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids,
                **{CACHE_KWARG: cache}, use_cache=use_cache)
    return out[0] if isinstance(out, tuple) else out


def assign_cache_slots(decoder: nn.Module, first_slot: int) -> None:
    """Point layer i of this member at cache slot first_slot + i, so one DynamicCache holds every member."""
    for i, layer in enumerate(decoder.layers):
        layer.self_attn.layer_idx = first_slot + i


def new_cache(config) -> DynamicCache:
    return DynamicCache(config=config)


def cache_from_kwargs(kwargs: dict):
    return kwargs.pop(CACHE_KWARG, None) if CACHE_KWARG in kwargs else kwargs.pop("past_key_values", None)


def causal_lm_output(loss, logits, cache) -> CausalLMOutputWithPast:
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: cache})


def output_cache(output):
    return getattr(output, CACHE_KWARG)


# ---- batched members (bts.core.batched): the weights of one Llama-family decoder block, by role --------------------
def block_parameters(layer) -> dict[str, nn.Parameter]:
    """The block's parameters keyed by role (q, k, v, o, gate, up, down, ln1, ln2; q_bias/k_bias/v_bias/o_bias
    and q_norm/k_norm where the architecture has them)."""
    attn, mlp = layer.self_attn, layer.mlp
    params = {"ln1": layer.input_layernorm.weight, "ln2": layer.post_attention_layernorm.weight,
              "gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight}
    for role in ("q", "k", "v", "o"):
        linear = getattr(attn, f"{role}_proj")
        params[role] = linear.weight
        if linear.bias is not None:
            params[f"{role}_bias"] = linear.bias
    for role in ("q", "k"):
        norm = getattr(attn, f"{role}_norm", None)
        if norm is not None:
            params[f"{role}_norm"] = norm.weight
    if getattr(mlp.gate_proj, "bias", None) is not None:
        raise BTSError("batched members: MLP biases are not supported; use set_execution('loop').")
    return params


def block_meta(layer) -> dict:
    attn = layer.self_attn
    config = attn.config
    return {"head_dim": attn.head_dim, "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "scaling": attn.scaling, "eps": layer.input_layernorm.variance_epsilon, "act": layer.mlp.act_fn,
            "qk_eps": attn.q_norm.variance_epsilon if getattr(attn, "q_norm", None) is not None else None}
