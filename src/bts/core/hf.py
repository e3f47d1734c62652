"""The one place that touches transformers internals (pinned to 5.24; its per-layer API moves between minors).

bts runs several Hugging Face decoders block by block, each member as itself. That needs things transformers does
not promise to keep stable: the decoder-layer call (5.24 renamed `past_key_values` to `cache` and dropped
`cache_position`), the causal-mask builders, the rotary-embedding call, the KV-cache layout (one cache, a slot per
member layer, reached through `MemberCache`), what a family's model does around its blocks (embedding multipliers,
logit scaling and softcapping: the table in bts.core.families), the name of the cache field on model outputs,
and, for BAM, how to build a family's decoder pieces (layer, rotary, embedding, norm) one by one and call its
attention module on its own.
Everything of that kind lives here, so a new transformers release is a change to this file, and a new family a line
in bts.core.families.
"""

from __future__ import annotations

import copy
import importlib

import torch
from torch import nn
from transformers import AutoModel, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from bts.core.families import FAMILIES, Family
from bts.errors import BTSError

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

CACHE_KWARG = "cache"  # 5.0-5.23: "past_key_values"


def check_supported(config) -> None:
    if config.model_type not in FAMILIES:
        raise BTSError(
            f"model_type '{config.model_type}' is not supported by bts (supported: {', '.join(SUPPORTED_MODEL_TYPES)})."
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise BTSError(f"model_type '{config.model_type}' with use_bidirectional_attention=True is not supported by "
                       "bts (a stitched model is a causal LM).")


def family(config) -> Family:
    return FAMILIES[config.model_type]


def decoder_of(causal_lm: nn.Module) -> nn.Module:
    """The transformer body (embeddings, layers, final norm, rotary) of a `*ForCausalLM`."""
    return causal_lm.model


def layer_types(config) -> list[str]:
    """Attention type of each layer ("full_attention" / "sliding_attention"), as the mask dict is keyed. A config
    without layer_types slides in every block when it sets a sliding_window (MistralModel and Phi3Model build one
    sliding mask for all blocks, and transformers' cache reads the config the same way)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * config.num_hidden_layers


def mask_key(config) -> tuple:
    """Members with equal keys get equal masks (built once per forward and shared)."""
    return (tuple(layer_types(config)), getattr(config, "sliding_window", None), config._attn_implementation)


def build_masks(config, inputs_embeds, attention_mask, cache, position_ids, first_slot: int | None = None) -> dict:
    """Causal masks keyed by layer type, for a member whose layer i is cache slot first_slot + i (None: let
    transformers find the slot in the cache, as a model of its own does)."""
    types = layer_types(config)
    kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                  position_ids=position_ids)

    def slot(kind):
        if first_slot is None or cache is None:
            return None
        return first_slot + (types.index(kind) if kind in types else 0)

    masks = {"full_attention": create_causal_mask(**kwargs, layer_idx=slot("full_attention"))}
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs, layer_idx=slot("sliding_attention"))
    return masks


def embed(decoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The member's input embeddings, as its own model computes them (Gemma's √d scale lives in its embedding
    module; Granite multiplies by embedding_multiplier)."""
    return scale_embeddings(decoder.config, decoder.embed_tokens(input_ids))


def scale_embeddings(config, states: torch.Tensor) -> torch.Tensor:
    field = family(config).embed_multiplier
    return states if field is None else states * getattr(config, field)


def rotaries(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """The member's own rotary embedding (its θ and scaling) keyed by layer type: Gemma 3 has one per type."""
    return rotaries_of(decoder.rotary_emb, decoder.config, hidden, position_ids)


def rotaries_of(rotary_emb: nn.Module, config, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
    types = dict.fromkeys(layer_types(config))
    if family(config).rotary_per_type:
        return {kind: rotary_emb(hidden, position_ids, kind) for kind in types}
    cos_sin = rotary_emb(hidden, position_ids)
    return dict.fromkeys(types, cos_sin)


def context_length(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def lm_logits(causal_lm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The member's LM head on its final-normed stream, with its family's logit scaling and final softcapping."""
    return scale_logits(causal_lm.config, causal_lm.lm_head(hidden))


def scale_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """The family's logit scaling and final softcapping, applied to the LM head's output."""
    fam = family(config)
    if fam.logits_divisor is not None:
        logits = logits / getattr(config, fam.logits_divisor)
    cap = getattr(config, fam.final_softcap, None) if fam.final_softcap is not None else None
    if cap is not None:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits


def call_layer(layer, hidden, *, mask, position_embeddings, position_ids, cache, use_cache) -> torch.Tensor:
    out = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids,
                **{CACHE_KWARG: cache}, use_cache=use_cache)
    return out[0] if isinstance(out, tuple) else out


# ---- one KV cache for every member ------------------------------------------------------------------------------
class MemberCache:
    """Member m's view of the stitched model's cache for one forward: its layer i (attention `layer_idx` i, as in
    the member's own model) reads and writes slot first_slot + i. Nothing on the member's modules changes, so a
    member keeps working on its own and one model object can serve several stitched models."""

    def __init__(self, cache, first_slot: int):
        self.cache, self.first_slot = cache, first_slot

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.first_slot + layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(self.first_slot + layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.cache.get_mask_sizes(query_length, self.first_slot + layer_idx)

    @property
    def is_compileable(self) -> bool:
        return self.cache.is_compileable


def member_cache(cache, first_slot: int):
    """What member layers are given as their cache: the cache itself for the hub (slots 0..L-1), else a view."""
    return cache if cache is None or first_slot == 0 else MemberCache(cache, first_slot)


def prepare_cache(cache, members) -> None:
    """Give each member's slots the cache layer its own model would use: a sliding-window layer of its window where
    it slides, a full one elsewhere. members: (first_slot, config) pairs. Filled slots are left as they are."""
    if not isinstance(cache, DynamicCache):
        return
    for first, config in members:
        window = getattr(config, "sliding_window", None)
        for i, kind in enumerate(layer_types(config)):
            while len(cache.layers) <= first + i:
                cache.layers.append(DynamicLayer())
            layer = cache.layers[first + i]
            if layer.is_initialized:
                continue
            if kind == "sliding_attention":
                if not (isinstance(layer, DynamicSlidingWindowLayer) and layer.sliding_window == window):
                    cache.layers[first + i] = DynamicSlidingWindowLayer(sliding_window=window)
            elif type(layer) is not DynamicLayer:
                cache.layers[first + i] = DynamicLayer()


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


def batchable(decoders: list) -> str | None:
    """Why these members cannot run batched (bts.core.batched), in a few words; None if they can: a Llama-style
    family (bts.core.families), and block by block the same shapes, attention settings and masks."""
    kinds = {dec.config.model_type for dec in decoders}
    not_batched = sorted(k for k in kinds if not FAMILIES[k].batched)
    if not_batched:
        return f"{not_batched[0]} members run on the loop path only"
    if len(kinds) > 1 or len({mask_key(dec.config) for dec in decoders}) > 1:
        return "the members differ in family, attention types or sliding window"
    for layers in zip(*(dec.layers for dec in decoders)):
        signatures = {(tuple((k, tuple(p.shape)) for k, p in block_parameters(layer).items()),
                       tuple((k, v if k != "act" else type(v)) for k, v in block_meta(layer).items()))
                      for layer in layers}
        if len(signatures) > 1:
            return "the members' blocks differ in shape or attention settings"
    return None


# ---- a family's decoder pieces, built and called one by one (bts.baselines.bam) ------------------------------------
# Where a block's norms sit, by role (attn_in: before the attention, attn_out: on its output, likewise for the MLP),
# as attribute names of the family's decoder layer; bts.core.families says which layout each family has.
BLOCK_NORMS = {
    "pre": {"attn_in": "input_layernorm", "ffn_in": "post_attention_layernorm"},
    "sandwich": {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                 "ffn_in": "pre_feedforward_layernorm", "ffn_out": "post_feedforward_layernorm"},
    "post": {"attn_out": "post_attention_layernorm", "ffn_out": "post_feedforward_layernorm"},
}


def block_norms(config) -> dict[str, str]:
    return dict(BLOCK_NORMS[family(config).block])


def residual_multiplier(config) -> float:
    field = family(config).residual_multiplier
    return 1.0 if field is None else float(getattr(config, field))


def _family_class(config, suffix: str) -> type:
    check_supported(config)
    causal = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    module = importlib.import_module(causal.__module__)
    return getattr(module, causal.__name__.removesuffix("ForCausalLM") + suffix)


def new_decoder_layer(config, layer_idx: int) -> nn.Module:
    """A freshly initialised decoder layer of the family (its attention, MLP and norms), as its model builds it."""
    return _family_class(config, "DecoderLayer")(config, layer_idx)


def attention_of(layer) -> nn.Module:
    return layer.self_attn


def mlp_of(layer) -> nn.Module:
    return layer.mlp


def new_rotary(config) -> nn.Module:
    return _family_class(config, "RotaryEmbedding")(config=config)


def _zero_layer_model(config, attn_implementation=None):
    empty = copy.deepcopy(config)
    empty.num_hidden_layers = 0
    if getattr(empty, "layer_types", None) is not None:
        empty.layer_types = []
    return AutoModel.from_config(empty, attn_implementation=attn_implementation or config._attn_implementation)


def new_embedding_and_norm(config) -> tuple[nn.Module, nn.Module]:
    """The family's token embedding (Gemma's scales by √d itself) and final norm, built as its model builds them."""
    shell = _zero_layer_model(config)
    return shell.embed_tokens, shell.norm


def family_shell(config, attn_implementation: str | None) -> nn.Module:
    """The family's model with no blocks, on the meta device (no memory): its `_init_weights` is the family's own
    initialisation (norms, Gemma's embedding scale, Gemma 3's per-type rotary buffers) and its config's
    `_attn_implementation` the requested one, or eager where the family refuses SDPA, transformers' default (Gemma 2)."""
    with torch.device("meta"):
        try:
            return _zero_layer_model(config, attn_implementation)
        except ValueError:
            if attn_implementation not in (None, "sdpa"):
                raise
            return _zero_layer_model(config, "eager")


def kv_parts(attn) -> list[str]:
    """The submodules of an attention that make its keys and values (kv_sharing shares them across experts)."""
    if not all(isinstance(getattr(attn, name, None), nn.Module) for name in ("k_proj", "v_proj")):
        raise BTSError(f"kv_sharing needs separate k_proj and v_proj; {type(attn).__name__} has none "
                       "(fused projections).")
    return ["k_proj", "v_proj"] + (["k_norm"] if isinstance(getattr(attn, "k_norm", None), nn.Module) else [])


def call_attention(attn, hidden, *, mask, position_embeddings, position_ids, cache) -> torch.Tensor:
    """A family's attention module on its normed input (its rotary, masks, softcaps and q/k norms inside it); it
    reads and writes its cache slot `layer_idx` through `cache` (a MemberCache view for a member's own slots)."""
    out = attn(hidden_states=hidden, position_embeddings=position_embeddings, attention_mask=mask,
               position_ids=position_ids, **{CACHE_KWARG: cache})
    return out[0] if isinstance(out, tuple) else out
