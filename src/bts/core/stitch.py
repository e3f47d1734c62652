"""Stitch layers of Branch-Train-Stitch (Zhang et al., 2025, arXiv 2502.00075, §3 and Appendix B).

Notation as in the paper: h_0 is the hub's residual stream, h_1..h_n the experts', each [B, T, d]. A stitch layer
has n projections W_proj_i (d×d, no bias) and one gate W_gate: d → (n+1)·d that reads the hub only, so every
channel gets its own gate value per member. That is (2n+1)·d² weights per layer, the paper's count (264M for
n=3, d=3072, K=4).

Experts → Hub (E→H), a per-channel softmax over members:
    z    = dropout(W_gate h_0)                      [B, T, n+1, d]
    g    = softmax(z, over members)
    ĥ_i  = W_proj_i h_i
    h_0 ← g_0 ⊙ h_0 + Σ_i g_i ⊙ ĥ_i

Hub → Experts (H→E), an independent sigmoid per expert (g_0 is computed, as in the paper, and unused):
    g    = sigmoid(dropout(W_gate h_0))
    h_i ← (1 − g_i) ⊙ h_i + g_i ⊙ W_proj_i h_0

The paper leaves initialisation open; `init` selects one of:
  "blend"      (default) W_proj = I, W_gate = 0, and each layer's output is blended into its input stream through a
               zero-initialised per-channel gate, Flamingo-style: h ← h + tanh(a) ⊙ (stitch(h) − h), a = 0. At step 0
               the model is exactly the hub, and ∂L/∂a ≠ 0 at once because stitch(h) ≠ h (experts differ from the
               hub), so training starts moving immediately. d extra parameters per layer.
  "bias"       W_proj = I, W_gate = 0, a gate bias of ±beta that saturates towards the hub (hub logit +β, experts
               −β; H→E −β). Matches the hub only for large β, where gradients vanish below Adam's ε.
  "mixturekit" W_proj = I, W_gate = 0, no bias: E→H starts as a uniform average, H→E at g = 0.5 (MixtureKit's
               training script). Does not start as the hub.
  "default"    PyTorch's default nn.Linear initialisation (what the paper's text literally specifies: nothing).
  "lstsq"      "blend", except W_proj is then fitted on data by least squares (bts.core.calibrate): E→H maps each
               expert's stream onto the hub's, H→E the hub's onto each expert's. Built here as "blend" (W_proj = I);
               the pipeline's stitch stage and `bts stitch` fit it before training.
The choice between them was measured on the demo (docs/ablations.md).

Adding an expert (bts.core.surgery) adds two things, both off on the plain path:
  presence     an optional per-member, per-channel weight inside the E→H softmax, g_i ∝ p_i·exp(z_i), p ≥ 0. A newly
               added expert starts at p = 0: it gets exactly no mass and the others keep theirs, yet ∂L/∂p ≠ 0, so
               training can open it (a −∞ logit bias would be exact too, but its gradient is 0).
  active       forward(…, active=[expert indices]) runs the stitch over a subset of the experts only (sparse
               inference): their slices of W_proj, W_gate and the blend, so E→H gates renormalise over the
               active members.

What the expert streams carry after an E→H layer is the other open question (`expert_stream`): Appendix B and
MixtureKit return the projected states ĥ_i ("projected"); "raw" (the default) leaves experts untouched, so E→H
changes the hub only. They coincide at identity projections. We default to "raw" because it measured better on
the demo (held-out 5.215 vs 5.241 after 100 stitch steps, docs/ablations.md) and is cheaper: expert streams then
depend on stitch parameters only through H→E layers, so less of the experts' forward is kept for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bts.errors import BTSError

E2H, H2E = "e2h", "h2e"
INITS = ("blend", "bias", "mixturekit", "default", "lstsq")
BLENDED = ("blend", "lstsq")  # the inits with the zero-initialised blend gate
EXPERT_STREAMS = ("projected", "raw")


class StitchLayer(nn.Module):
    """One E→H or H→E stitch between n+1 members of width d."""

    def __init__(self, d: int, n: int, kind: str, *, init: str = "blend", beta: float = 8.0,
                 gate_dropout: float = 0.0, expert_stream: str = "raw"):
        super().__init__()
        assert kind in (E2H, H2E) and init in INITS and expert_stream in EXPERT_STREAMS
        self.d, self.n, self.kind, self.init_mode, self.beta = d, n, kind, init, beta
        self.expert_stream = expert_stream
        self.proj = nn.Parameter(torch.empty(n, d, d))  # W_proj_i, applied as h @ W_proj_i^T
        self.gate = nn.Linear(d, (n + 1) * d, bias=init == "bias")  # W_gate: hub -> (n+1) per-channel logits
        self.dropout = nn.Dropout(gate_dropout)
        # The zero-initialised blend a: one per channel of the hub (E→H) or of each expert (H→E).
        self.blend = nn.Parameter(torch.zeros(1 if kind == E2H else n, d)) if init in BLENDED else None
        self.presence = None  # E→H only, [n+1, d]; see enable_presence
        self.reset_parameters()

    def enable_presence(self) -> None:
        """Add the E→H presence weights p (all 1: no change to the outputs). Used when experts are added."""
        assert self.kind == E2H
        if self.presence is None:
            self.presence = nn.Parameter(torch.ones(self.n + 1, self.d, device=self.proj.device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init_mode == "default":
            for i in range(self.n):
                nn.init.kaiming_uniform_(self.proj[i], a=5**0.5)  # what nn.Linear does
            self.gate.reset_parameters()
            return
        self.proj.copy_(torch.eye(self.d).expand(self.n, self.d, self.d))
        self.gate.weight.zero_()
        if self.gate.bias is not None:  # "bias": saturate towards the hub
            bias = self.gate.bias.view(self.n + 1, self.d)
            bias.fill_(-self.beta)
            if self.kind == E2H:
                bias[0].fill_(self.beta)
        if self.blend is not None:
            self.blend.zero_()

    def num_paper_params(self) -> int:
        """(2n+1)·d², the count the paper reports (no bias, no blend)."""
        return (2 * self.n + 1) * self.d * self.d

    def gate_values(self, h0: torch.Tensor, active: list[int] | None = None) -> torch.Tensor:
        """Gates g for every member and channel: [B, T, n+1, d] (softmax for E→H, sigmoid for H→E).
        With `active` (expert indices): [B, T, k+1, d], hub first, E→H renormalised over those members."""
        members = None if active is None else [0] + [1 + a for a in active]
        if members is None:
            z = self.gate(h0).unflatten(-1, (self.n + 1, self.d))
        else:  # only the active members' rows of W_gate: their logits are all that is computed
            w = self._rows("gate", self.gate.weight.view(self.n + 1, self.d, self.d), members).flatten(0, 1)
            b = None if self.gate.bias is None else \
                self._rows("bias", self.gate.bias.view(self.n + 1, self.d), members).flatten()
            z = F.linear(h0, w, b).unflatten(-1, (len(members), self.d))
        z = self.dropout(z)
        if self.kind == H2E:
            return torch.sigmoid(z)
        if self.presence is None:
            return torch.softmax(z, dim=-2)
        p = self.presence.clamp_min(0)  # projected to p ≥ 0 during training; the clamp only guards
        p = p if members is None else p[members]
        # Weighted softmax, shifted by the largest logit among present members (a constant: no gradient needed).
        shift = z.detach().masked_fill(p <= 0, float("-inf")).amax(-2, keepdim=True)
        w = torch.exp(z - torch.where(torch.isfinite(shift), shift, 0)) * p
        return w / w.sum(-2, keepdim=True).clamp_min(1e-30)

    def mixing_weights(self, h0: torch.Tensor, active: list[int] | None = None) -> torch.Tensor:
        """What each member really contributes, [B, T, n+1, d]: the gates with the blend folded in.

        E→H: hub (1 − t) + t·g_0, expert i t·g_i, with t = tanh(a) (t = 1 without the blend), so they sum to 1.
        H→E: how far each expert stream moves towards the projected hub, t_i·g_i (the hub entry is 0)."""
        g = self.gate_values(h0, active)
        if self.blend is None:
            return g if self.kind == E2H else torch.cat([torch.zeros_like(g[..., :1, :]), g[..., 1:, :]], -2)
        t = torch.tanh(self._blend(active))  # [1, d] or [k, d]
        if self.kind == E2H:
            w = g * t
            w[..., 0, :] += 1 - t[0]
            return w
        return torch.cat([torch.zeros_like(g[..., :1, :]), g[..., 1:, :] * t], -2)

    def _rows(self, name: str, tensor: torch.Tensor, index: list[int]) -> torch.Tensor:
        """tensor[index] (the active members' rows). In inference the copy is kept while the weights are unchanged
        (same storage and version), so sparse decoding does not copy weight rows at every step."""
        if torch.is_grad_enabled():
            return tensor[index]
        cache = self.__dict__.setdefault("_row_cache", {})  # plain attribute: not a buffer, never saved
        key = (tuple(index), tensor.data_ptr(), tensor._version, tensor.dtype)
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, tensor[index])
        return cache[name][1]

    def _blend(self, active: list[int] | None) -> torch.Tensor:
        return self.blend if active is None or self.kind == E2H else self.blend[active]

    def _project(self, x: torch.Tensor, active: list[int] | None = None) -> torch.Tensor:
        """x: [k, B, T, d] (or [B, T, d], broadcast to every expert) -> [k, B, T, d] with W_proj_i applied."""
        proj = self.proj if active is None else self._rows("proj", self.proj, active)
        if x.dim() == 3:
            return torch.einsum("btd,ned->nbte", x, proj)
        return torch.einsum("nbtd,ned->nbte", x, proj)

    def forward(self, h0: torch.Tensor, experts: torch.Tensor, active: list[int] | None = None):
        """h0: [B, T, d]; experts: [n, B, T, d] (or [k, B, T, d]: the `active` experts only, in that order).
        Returns the new (h0, experts)."""
        g = self.gate_values(h0, active).movedim(-2, 0)  # [n+1, B, T, d]
        if self.kind == E2H:
            projected = self._project(experts, active)
            mixed = g[0] * h0 + (g[1:] * projected).sum(0)
            new_h0 = mixed if self.blend is None else h0 + torch.tanh(self.blend[0]) * (mixed - h0)
            new_experts = projected if self.expert_stream == "projected" else experts
            return new_h0, new_experts
        mixed = (1 - g[1:]) * experts + g[1:] * self._project(h0, active)
        if self.blend is not None:
            mixed = experts + torch.tanh(self._blend(active))[:, None, None, :] * (mixed - experts)
        return h0, mixed


def stitch_positions(num_layers: int, k: int) -> list[int]:
    """1-indexed blocks after which the K stitches sit: ⌈j·L/K⌉, j = 1..K (L=20, K=4 → 5, 10, 15, 20)."""
    return [-(-j * num_layers // k) for j in range(1, k + 1)]


def stitch_kinds(k: int, all_e2h: bool = False) -> list[str]:
    """Types alternate H→E / E→H, assigned backwards so the last is always E→H (only the hub's output is used)."""
    if all_e2h:
        return [E2H] * k
    return [E2H if (k - 1 - j) % 2 == 0 else H2E for j in range(k)]


def check_stitch_layout(positions: list, num_stitches: int, layers: int, of: str) -> None:
    """stitch.positions / stitch.num_stitches against a hub of `layers` blocks (`of` says which: 'the 4 layers of
    seed_model.path ...'), one sentence when they cannot be placed."""
    if positions and (any(not 1 <= p <= layers for p in positions) or positions != sorted(set(positions))):
        raise BTSError(f"stitch.positions must be increasing block numbers in 1..{layers} ({of}) (got {positions}).")
    if not positions and num_stitches > layers:
        raise BTSError(f"stitch.num_stitches must be at most {of} (got {num_stitches}).")


def check_stitch_options(*, init: str, expert_stream: str, beta: float, gate_dropout: float, prefix: str = "",
                         output: str = "hub") -> None:
    """Refuse invalid stitch options in one sentence naming the key (with `prefix`, e.g. "stitch." for a recipe).
    The one place these are checked: BTSForCausalLM.from_members and recipe loading both call it."""
    if init not in INITS:
        raise BTSError(f"{prefix}init must be one of {', '.join(INITS)} (got '{init}').")
    if expert_stream not in EXPERT_STREAMS:
        raise BTSError(f"{prefix}expert_stream must be one of {', '.join(EXPERT_STREAMS)} (got '{expert_stream}').")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
        raise BTSError(f"{prefix}beta must be a positive finite number (got {beta!r}).")
    if isinstance(gate_dropout, bool) or not isinstance(gate_dropout, (int, float)) or not 0.0 <= gate_dropout < 1.0:
        raise BTSError(f"{prefix}gate_dropout must be in [0, 1) (got {gate_dropout!r}).")
    from bts.core.heads import OUTPUTS

    if output not in OUTPUTS:
        raise BTSError(f"{prefix}output must be one of {', '.join(OUTPUTS)} (got {output!r}).")
