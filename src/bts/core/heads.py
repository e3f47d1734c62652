"""The stitched model's output, beyond the paper: mixing the experts' final norms and LM heads in as well.

The paper's output (`output="hub"`, the default) is the hub's final norm and LM head on the stitched hub stream, so
whatever an expert learnt in its own final norm and head never reaches the output. The two options here add a last
mixing step after the final block; every expert then runs to the last block. Both gates read the hub's final
(stitched, pre-norm) stream, as the E→H gate does, and both start exactly as the hub through the same zero-initialised
blend as the stitches' default init (t = tanh(a), a = 0): the hub's weight is (1 − t) + t·g_0 and expert i's t·g_i,
so the weights sum to 1, are exactly (1, 0, …, 0) at step 0, and ∂L/∂a ≠ 0 at once. mix_hidden lets t go negative
(like the stitches' blend: the weights may extrapolate, logits stay linear); mix_logprobs clamps t ≥ 0, so every
w_m ≥ 0 and the mixture is a distribution.

  mix_hidden    a per-token, per-channel softmax over members (W_gate: d → (n+1)·d) of each member's own final-normed
                stream n_m = norm_m(h_m); each member's own head reads its weighted share, and the logits add up:
                    logits = Σ_m head_m(w_m ⊙ n_m)
                Why each member's own head and not the hub's head on the mix: n_m lives in expert m's basis, which
                its own head reads with no projection, and the expert's gain sits largely in that head (the measured
                weakness this option is for). The hub head on mixed states would discard it again. Since heads are
                linear, this is one head applied to the per-channel mixture of member features; in probability
                space it is a gated product of experts (logits add).
  mix_logprobs  a per-token softmax over members (W_gate: d → n+1) of each member's full forward's next-token
                distribution, mixed in probability space (BTM's ensemble with a learned token-level gate):
                    log p = log Σ_m w_m p_m = M + log Σ_m w_m exp(log p_m − M),  M = max_m log p_m (no gradient)
                The shift by M keeps every exp ≤ 1; writing it as Σ w_m p_m (not logsumexp of log w_m) keeps
                ∂L/∂w_m finite at w_m = 0, which the start-as-hub init needs. The output is normalised log-probs,
                which serve as logits (softmax and cross-entropy read them unchanged).

Causality: every term is per position (norms, heads, gates read position t only), so no future token leaks in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OUTPUTS = ("hub", "mix_hidden", "mix_logprobs")


class OutputMix(nn.Module):
    """The gate and blend of one output-mixing mode over n+1 members of width d (hub first)."""

    def __init__(self, d: int, n: int, mode: str):
        super().__init__()
        assert mode in OUTPUTS[1:]
        self.d, self.n, self.mode = d, n, mode
        per_channel = mode == "mix_hidden"
        self.gate = nn.Linear(d, (n + 1) * (d if per_channel else 1), bias=False)
        self.blend = nn.Parameter(torch.zeros(d if per_channel else 1))  # a; t = tanh(a) = 0: exactly the hub
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.gate.weight.zero_()
        self.blend.zero_()

    def mixing_weights(self, h0: torch.Tensor, active: list[int] | None = None) -> torch.Tensor:
        """Each member's weight, [B, T, k+1, d] (mix_hidden) or [B, T, k+1, 1] (mix_logprobs); they sum to 1 over
        members. active: expert indices (sparse inference), the softmax renormalised over the hub and those."""
        z = self.gate(h0).unflatten(-1, (self.n + 1, -1))
        if active is not None:
            z = z[..., [0] + [1 + a for a in active], :]
        t = torch.tanh(self.blend)
        if self.mode == "mix_logprobs":  # a mixture of distributions needs w ≥ 0 (Σ w_m p_m > 0); at a = 0 the
            t = t.clamp_min(0)           # clamp still passes the gradient, so training can open it
        w = torch.softmax(z, dim=-2) * t
        w[..., 0, :] += 1 - t
        return w

    def forward(self, h0: torch.Tensor, normed: list[torch.Tensor], heads: list, vocab: int, width: int,
                active: list[int] | None = None) -> torch.Tensor:
        """h0: the hub's final stream [B, T, d]; normed: each running member's final-normed stream (hub first);
        heads: for each, a function from hidden states to its raw head logits; vocab: the ids every member shares;
        width: the hub's vocabulary. Returns [B, T, width] logits (mix_hidden: before the family's logit scaling,
        which the caller applies once; mix_logprobs: log-probs of each member's scaled logits, for the caller to
        leave unscaled). Entries from `vocab` on are the caller's to mask."""
        w = self.mixing_weights(h0.to(self.gate.weight.dtype), active)
        if self.mode == "mix_hidden":
            logits = None
            for m, (x, head) in enumerate(zip(normed, heads)):
                part = head((w[..., m, :] * x).to(x.dtype)).to(w.dtype)
                logits = part if logits is None else logits + _fit(part, logits.shape[-1], vocab, 0.0)
            return logits
        logps = [torch.log_softmax(head(x).to(w.dtype)[..., :vocab], dim=-1) for x, head in zip(normed, heads)]
        logps = torch.stack(logps, dim=-2)  # [B, T, k+1, V]
        shift = logps.detach().amax(-2, keepdim=True)
        mixed = shift.squeeze(-2) + torch.log((w * torch.exp(logps - shift)).sum(-2))
        return _fit(mixed, width, vocab, torch.finfo(mixed.dtype).min)


def _fit(part: torch.Tensor, width: int, vocab: int, fill: float) -> torch.Tensor:
    """A member's logits [..., V_m] cut to the shared vocabulary and padded to the hub's width."""
    part = part[..., :vocab]
    return F.pad(part, (0, width - part.shape[-1]), value=fill)
