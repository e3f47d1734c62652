"""Batched members: run the same decoder block of every member as one set of batched matmuls.

The reference path (`model.set_execution("loop")`) calls each member's own Hugging Face layer in turn, so a
stitched model with n+1 members dispatches n+1 times as many small operations as one model. When the members share
an architecture, dtype and device (they always share the architecture), block i of all of them is the same
computation with different weights, so it can run once over stacked weights:

    x: [M, B, T, d]  (M running members)        W_q: [M, d, H·hd] (stacked, transposed view)
    q = bmm(RMSNorm(x), W_q)  … one bmm per projection instead of M matmuls
    attention: members folded into the head axis, [B, M·H, T, hd], so one SDPA call covers all members and the
    KV cache holds [B, M·H_kv, S, hd] per block. Grouped-query attention still pairs the right heads:
    query head m·H + h reads kv head (m·H + h) // g = m·H_kv + h // g.

Memory: the stacked tensors are the members' weights — each member parameter is re-pointed to its slice of the
stack, so batching costs no second copy. Running a subset of experts (sparse inference) stacks copies of the
active members' weights, kept until the active set changes.

The math below mirrors LlamaDecoderLayer (and Mistral's, Qwen2's biases, Qwen3's q/k norms) as of transformers
5.24 (the families marked `batched` in bts.core.families; the others run on the loop path), with each member's own
rotary embedding; bts.core.hf.block_parameters names the weights, and tests/core/test_batched.py checks this path
against the reference one for every batched family, with and without a KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bts.core import hf
from bts.errors import BTSError


class StackedBlock:
    """Block i's weights for M members, stacked along a leading member axis."""

    def __init__(self, layers: list, share: bool):
        self.meta = hf.block_meta(layers[0])
        params = [hf.block_parameters(layer) for layer in layers]
        self.weights = {}
        for name in params[0]:
            stack = torch.stack([p[name].detach() for p in params])
            if share:  # members now read their weights from the stack: one copy in memory, not two
                for m, p in enumerate(params):
                    p[name].data = stack[m]
            self.weights[name] = stack
        self.anchor = anchor(layers)


def anchor(layers: list) -> tuple:
    """Where each member's block weights live now: it changes if a member is moved or re-cast (then rebuild)."""
    return tuple(hf.block_parameters(layer)["q"].data_ptr() for layer in layers)


def stacked_blocks(decoders: list, num_blocks: int, share: bool) -> list[StackedBlock]:
    return [StackedBlock([dec.layers[i] for dec in decoders], share) for i in range(num_blocks)]


class StackCache:
    """The running members' stacked blocks, kept between forwards: built once per key (active set, number of
    blocks) and rebuilt if the members were moved or re-cast since."""

    def __init__(self):
        self.key, self.blocks = None, None

    def get(self, decoders: list, key, num_blocks: int, share: bool) -> list[StackedBlock]:
        first = [dec.layers[0] for dec in decoders]
        if self.key != key or self.blocks[0].anchor != anchor(first):
            if len({(p.dtype, p.device) for layer in first for p in layer.parameters()}) > 1:
                raise BTSError("batched members need every member in one dtype on one device; "
                               "use set_execution('loop').")
            self.key = self.blocks = None  # free the previous stacks before building new ones
            self.blocks = stacked_blocks(decoders, num_blocks, share)
            self.key = key
        return self.blocks


def _rms(x, weight, eps):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _linear(x, w, b=None):
    """x: [M, N, in], w: [M, out, in] (nn.Linear layout), b: [M, out] -> [M, N, out]."""
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def block_forward(block: StackedBlock, x: torch.Tensor, *, mask, position_embeddings, cache, slot: int):
    """One decoder block for every running member. x: [M, B, T, d] -> [M, B, T, d]; position_embeddings: each
    member's (cos, sin), stacked [M, B, T, hd]; mask: shared by the members (they have equal attention settings)."""
    w, meta = block.weights, block.meta
    M, B, T, d = x.shape
    hd, heads, kv_heads = meta["head_dim"], meta["heads"], meta["kv_heads"]

    h = _rms(x, w["ln1"][:, None, None, :], meta["eps"]).reshape(M, B * T, d)
    q = _linear(h, w["q"], w.get("q_bias")).view(M, B, T, heads, hd)
    k = _linear(h, w["k"], w.get("k_bias")).view(M, B, T, kv_heads, hd)
    v = _linear(h, w["v"], w.get("v_bias")).view(M, B, T, kv_heads, hd)
    if "q_norm" in w:  # Qwen3: RMSNorm over each head before the rotary embedding
        q = _rms(q, w["q_norm"][:, None, None, None, :], meta["qk_eps"])
        k = _rms(k, w["k_norm"][:, None, None, None, :], meta["qk_eps"])
    # Fold members into heads: [M, B, T, H, hd] -> [B, M·H, T, hd]
    q, k, v = (t.permute(1, 0, 3, 2, 4).reshape(B, M * t.shape[3], T, hd) for t in (q, k, v))
    # Each member's own rotary (its θ and scaling): [M, B, T, hd] -> [B, M, 1, T, hd], against [B, M, H, T, hd].
    cos, sin = (e.transpose(0, 1).unsqueeze(2) for e in position_embeddings)
    q, k = q.reshape(B, M, heads, T, hd), k.reshape(B, M, kv_heads, T, hd)
    q = (q * cos + _rotate_half(q) * sin).reshape(B, M * heads, T, hd)
    k = (k * cos + _rotate_half(k) * sin).reshape(B, M * kv_heads, T, hd)
    if cache is not None:
        k, v = cache.update(k, v, slot)
    groups = heads // kv_heads
    if groups > 1:  # as transformers' repeat_kv: each kv head serves `groups` consecutive query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    causal = T > 1 and mask is None
    if causal and k.shape[2] > T:
        k, v = k[:, :, :T], v[:, :, :T]
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=meta["scaling"])
    attn = attn.view(B, M, heads, T, hd).permute(1, 0, 3, 2, 4).reshape(M, B * T, heads * hd)
    x = x + _linear(attn, w["o"], w.get("o_bias")).view(M, B, T, d)

    h = _rms(x, w["ln2"][:, None, None, :], meta["eps"]).reshape(M, B * T, d)
    up = meta["act"](_linear(h, w["gate"])) * _linear(h, w["up"])
    return x + _linear(up, w["down"]).view(M, B, T, d)
