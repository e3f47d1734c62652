"""The decoder families bts stitches, and what each does differently around its decoder blocks.

Every member runs its own Hugging Face blocks (attention, MLP, norms, softcapping, multipliers, q/k norms: all inside
the layer), so most of a family lives in transformers. What a stitched model has to reproduce by hand is what a
family's `*Model.forward` and `*ForCausalLM.forward` do *around* the blocks; that is this table, read by
bts.core.hf (the one module that touches transformers internals):

  embed_multiplier   config field the embeddings are multiplied by after the lookup (Granite). Gemma's √d scale
                     needs no entry: its embedding module applies it itself.
  logits_divisor     config field the logits are divided by after the LM head (Granite's logits_scaling).
  final_softcap      config field of the final logit softcapping, cap·tanh(logits / cap) (Gemma 2 / 3).
  rotary_per_type    the rotary module takes the layer type and returns one embedding per type (Gemma 3: local and
                     global θ).
  batched            bts.core.batched re-implements its block (Llama-style: pre-norms, SwiGLU, optional q/k/v
                     biases and q/k norms); the others run on the loop path only.
  block              where the decoder block's norms sit, for models that rebuild a block from its attention and
                     MLP (bts.baselines.bam; the names are in bts.core.hf.BLOCK_NORMS): "pre" (a norm before the
                     attention and one before the MLP), "sandwich" (Gemma 2 / 3: also one after each), "post"
                     (OLMo 2: one after each, none before).
  residual_multiplier config field each block's attention and MLP outputs are multiplied by before the residual
                     add (Granite).

Adding a family is one entry here plus its tiny config in tests/helpers.py (tests/core/test_families.py then checks
it: starts as the hub, cached = uncached generation, causality, batched or refused, save → load; and
tests/baselines/test_bam_families.py builds BAM on it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    embed_multiplier: str | None = None
    logits_divisor: str | None = None
    final_softcap: str | None = None
    rotary_per_type: bool = False
    batched: bool = False
    block: str = "pre"
    residual_multiplier: str | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family(batched=True),  # incl. Llama-3.x rope scaling, SmolLM2
    "mistral": Family(batched=True),  # sliding window in every block when set
    "qwen2": Family(batched=True),  # q/k/v biases, tied embeddings
    "qwen3": Family(batched=True),  # q/k norms
    "gemma": Family(),  # √d embedding scale (in its embedding module), (1 + w) RMSNorm, GeGLU
    # + attention softcaps, post-norms, alternating sliding / full blocks
    "gemma2": Family(final_softcap="final_logit_softcapping", block="sandwich"),
    # + local / global rotary
    "gemma3_text": Family(final_softcap="final_logit_softcapping", rotary_per_type=True, block="sandwich"),
    "phi3": Family(),  # fused qkv_proj and gate_up_proj, partial rotary
    "olmo2": Family(block="post"),  # post-norms, q/k norms over the whole projection
    # + the attention multiplier, inside its attention
    "granite": Family(embed_multiplier="embedding_multiplier", logits_divisor="logits_scaling",
                      residual_multiplier="residual_multiplier"),
}
