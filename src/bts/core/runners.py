"""How the members run in one forward: the model says what to compute, a runner says how.

`BTSForCausalLM.forward` is the paper's loop, written against one small interface:

    states = runner.embed(input_ids, attention_mask, position_ids)   # every running member embeds the tokens
    states = runner.block(i, states)                                 # decoder block i of the members
    states = runner.stitch(stitch, states)                           # a stitch layer mixes the streams (fp32)
    hub = runner.hub_stream(states)                                  # the hub's residual stream, [B, T, d]

`states` belongs to the runner: the caller only passes it on. Every runner runs the hub and the running experts
(sparse inference: `active`) and skips expert blocks after the last E→H stitch (`live` blocks run), which cannot
reach the output. The runners:

    LoopRunner        each member's own Hugging Face layer in turn (bts.core.hf.call_layer), states a list
    BatchedRunner     block i of every running member as one batched computation (bts.core.batched), states one
                      stacked [M, B, T, d] tensor while experts run; then the hub alone, as in the loop
    Checkpointed      wraps either: member blocks and stitches keep only their inputs and recompute in backward

The batched path matches the loop to float rounding; checkpointing changes no bit (tests/core/test_batched.py).
This file only chooses how to run blocks: the blocks themselves are bts.core.hf (Hugging Face layers) and
bts.core.batched (stacked weights), and the model picks a runner per forward (BTSForCausalLM._runner).
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from bts.core import batched, hf


def run(fn, *args, **kwargs):
    """Run one member block or stitch as is (Checkpointed passes its own)."""
    return fn(*args, **kwargs)


class MemberRunner:
    """The members for one forward: the hub's decoder first, then the running experts' (decoders), each with the
    first KV-cache slot of its layers (slots: 0 for the hub, (m+1)·L for expert m)."""

    def __init__(self, hub_config, decoders: list, *, active: list[int] | None, live: int, cache, use_cache,
                 slots: list[int] | None = None):
        self.hub_config, self.decoders, self.active = hub_config, decoders, active
        self.live = live  # expert blocks 0..live-1 run; later ones come after the last E→H stitch
        self.cache, self.use_cache = cache, use_cache
        self.slots = slots if slots is not None else [m * hub_config.num_hidden_layers for m in range(len(decoders))]
        self.types = [hf.layer_types(dec.config) for dec in decoders]  # per member: its own attention types

    def embed(self, input_ids, attention_mask, position_ids):
        """Every running member as its own model starts: its embeddings (with its family's scale), its masks (its
        attention types and sliding window, sized against its own cache slots) and its rotary embedding (its θ
        and scaling). Members with equal attention settings share one set of masks."""
        states = [hf.embed(dec, input_ids) for dec in self.decoders]
        if self.cache is not None:
            hf.prepare_cache(self.cache, [(s, dec.config) for s, dec in zip(self.slots, self.decoders)])
        self.caches = [hf.member_cache(self.cache, s) for s in self.slots]
        built, self.masks = {}, []
        for dec, x, slot in zip(self.decoders, states, self.slots):
            key = hf.mask_key(dec.config)
            if key not in built:
                built[key] = hf.build_masks(dec.config, x, attention_mask, self.cache, position_ids, first_slot=slot)
            self.masks.append(built[key])
        self.ropes = [hf.rotaries(dec, x, position_ids) for dec, x in zip(self.decoders, states)]
        self.position_ids = position_ids
        return states

    def block(self, i: int, states, call=run):
        """Decoder block i of the hub and, up to block live-1, the running experts. call(fn, x) runs each block
        computation (Checkpointed passes one that recomputes it in backward)."""
        raise NotImplementedError

    def stitch(self, stitch, states, call=run):
        """The stitch layer on the streams, in fp32; each stream goes back to its member's dtype."""
        dtype = [s.dtype for s in states] if isinstance(states, list) else states.dtype
        experts = self._experts(states)
        hub, experts = at_least_fp32(states[0]), at_least_fp32(experts)
        hub, experts = call(stitch, hub, experts, active=self.active)
        return self._join(hub, experts, dtype)

    def hub_stream(self, states) -> torch.Tensor:
        return states[0]

    def streams(self, states) -> list[torch.Tensor]:
        """Every running member's stream, hub first (an output mix reads them after the last block)."""
        return list(states.unbind(0)) if isinstance(states, torch.Tensor) else list(states)

    def _experts(self, states) -> torch.Tensor:  # [k, B, T, d]
        raise NotImplementedError

    def _join(self, hub, experts, dtype):
        raise NotImplementedError


class LoopRunner(MemberRunner):
    """The reference path: each member's own Hugging Face layer in turn. states: a list of [B, T, d] streams."""

    def block(self, i: int, states, call=run):
        states = list(states)
        members = self.decoders if i < self.live else self.decoders[:1]  # dead expert blocks: not run, not cached
        for m, dec in enumerate(members):
            kind = self.types[m][i]
            step = partial(hf.call_layer, dec.layers[i], mask=self.masks[m][kind],
                           position_embeddings=self.ropes[m][kind], position_ids=self.position_ids,
                           cache=self.caches[m], use_cache=self.use_cache)
            states[m] = call(step, states[m])
        return states

    def _experts(self, states):
        return torch.stack(states[1:])

    def _join(self, hub, experts, dtype):
        return [hub.to(dtype[0])] + [e.to(d) for e, d in zip(experts.unbind(0), dtype[1:])]


class BatchedRunner(LoopRunner):
    """Block i of every running member as one batched computation over stacked weights (blocks: one
    batched.StackedBlock per live block). states: one [M, B, T, d] tensor through block live-1; from block live
    only the hub runs, so the streams are split into the loop's list."""

    def __init__(self, *args, blocks: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks = blocks
        self.stacked = True  # the states are one tensor until the first hub-only block

    def embed(self, input_ids, attention_mask, position_ids):
        # The members share masks and block shapes (hf.batchable); block i of all of them is cache slot i, the
        # members folded into its heads, so the cache holds the hub's layout only.
        states = [hf.embed(dec, input_ids) for dec in self.decoders]
        if self.cache is not None:
            hf.prepare_cache(self.cache, [(0, self.decoders[0].config)])
        self.caches = [self.cache] + [hf.member_cache(self.cache, s) for s in self.slots[1:]]
        mask = hf.build_masks(self.decoders[0].config, states[0], attention_mask, self.cache, position_ids,
                              first_slot=0)
        self.masks = [mask] * len(self.decoders)
        self.ropes = [hf.rotaries(dec, x, position_ids) for dec, x in zip(self.decoders, states)]
        # Each member's own rotary, stacked: [M, B, T, hd] per layer type.
        self.stacked_ropes = {kind: tuple(torch.stack([r[kind][j] for r in self.ropes]) for j in range(2))
                              for kind in self.ropes[0]}
        self.position_ids = position_ids
        return torch.stack(states)

    def block(self, i: int, states, call=run):
        if i >= self.live:
            if self.stacked:
                states, self.stacked = list(states.unbind(0)), False
            return super().block(i, states, call)
        kind = self.types[0][i]
        step = partial(batched.block_forward, self.blocks[i], mask=self.masks[0][kind],
                       position_embeddings=self.stacked_ropes[kind], cache=self.cache, slot=i)
        return call(step, states)

    def _experts(self, states):
        return states[1:] if self.stacked else super()._experts(states)

    def _join(self, hub, experts, dtype):
        if not self.stacked:
            return super()._join(hub, experts, dtype)
        return torch.cat([hub.unsqueeze(0), experts]).to(dtype)


def _remat_block(fn, x):
    # Blocks before the first stitch carry no graph (frozen members): nothing to recompute.
    return checkpoint(fn, x, use_reentrant=False) if x.requires_grad else fn(x)


def _remat_stitch(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


class Checkpointed(MemberRunner):
    """Wraps a runner for training: member blocks and stitch layers keep no activations (only their inputs) and
    recompute them in backward. Less memory for long sequences, for about one more forward."""

    def __init__(self, inner: MemberRunner):
        self.inner = inner

    def embed(self, input_ids, attention_mask, position_ids):
        return self.inner.embed(input_ids, attention_mask, position_ids)

    def block(self, i: int, states):
        return self.inner.block(i, states, _remat_block)

    def stitch(self, stitch, states):
        return self.inner.stitch(stitch, states, _remat_stitch)

    def hub_stream(self, states):
        return self.inner.hub_stream(states)

    def streams(self, states):
        return self.inner.streams(states)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Stitch math runs in fp32 for fp32 and bf16 members, in fp64 for fp64 ones (like the stitch weights)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
