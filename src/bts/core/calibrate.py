"""The `lstsq` stitch initialisation: each W_proj fitted by least squares on the members' own streams.

Everything is as `blend` (W_gate = 0, blend a = 0, so the stitched model still starts exactly as the hub), except
W_proj. At a stitch after block p, with h_0 the hub's stream and h_i expert i's (the inputs that stitch sees):

    E→H  W_i = argmin_W Σ_tokens ‖W h_i − h_0‖²     the projected expert speaks the hub's basis (it is mixed
                                                    into the hub stream)
    H→E  W_i = argmin_W Σ_tokens ‖W h_0 − h_i‖²     the projected hub speaks expert i's basis (it is mixed
                                                    into expert i's stream)

Because every stitch starts as a no-op, one forward of the stitched model gives, at every stitch, exactly the
members' own streams: one pass over the calibration batches fits every layer. Only the d×d sums X^T X and X^T Y
are kept (float64, on the model's device), so memory does not grow with the number of tokens; the d×d system is
then solved on the CPU in float64 with torch.linalg.lstsq (gelsd), which gives the same minimum-norm solution as
lstsq on the [tokens, d] matrices themselves (pinv(X^T X) X^T = pinv(X)), also when X is rank-deficient.

`ridge` λ ≥ 0 (0, plain least squares, by default) shrinks towards the identity, the `blend` start:
(X^T X + λ s I) A = X^T Y + λ s I, with s = trace(X^T X)/d so λ is relative to the streams' scale.
Padding tokens (attention_mask 0, or labels −100 of unpacked batches) are left out. No member weight changes.
"""

from __future__ import annotations

import torch

from bts.core.device import model_device, to_device
from bts.core.stitch import E2H
from bts.errors import BTSError

CALIBRATION_SALT = 19  # batcher salt of the calibration batches: their own draw of the mix, not the first training steps


def check_calibration(init_batches, ridge, prefix: str = "stitch.") -> None:
    """The calibration settings (recipe keys stitch.init_batches, stitch.init_ridge), one sentence when bad."""
    if isinstance(init_batches, bool) or not isinstance(init_batches, int) or init_batches < 1:
        raise BTSError(f"{prefix}init_batches must be a positive integer (got {init_batches!r}).")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < float("inf"):
        raise BTSError(f"{prefix}init_ridge must be a non-negative finite number (got {ridge!r}).")


class _Sums:
    """Σ X^T X and Σ X^T Y of one stitch: [n, d, d] each (E→H: X = h_i, Y = h_0; H→E: X = h_0, Y = h_i)."""

    def __init__(self, kind: str):
        self.kind, self.xx, self.xy, self.yy, self.tokens = kind, None, None, 0.0, 0

    def add(self, h0: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor | None) -> None:
        h0, experts = h0.detach().double(), experts.detach().double()  # [B, T, d], [n, B, T, d]
        if keep is not None:
            h0, experts = h0[keep], experts[:, keep]  # [N, d], [n, N, d]
        h0, experts = h0.reshape(-1, h0.shape[-1]), experts.flatten(1, -2)
        if self.kind == E2H:
            xx, xy = experts.transpose(1, 2) @ experts, experts.transpose(1, 2) @ h0
            yy = (h0 * h0).sum().expand(len(experts))
        else:
            xx, xy = (h0.T @ h0).expand(len(experts), -1, -1), h0.T @ experts
            yy = (experts * experts).sum((1, 2))
        self.xx = xx if self.xx is None else self.xx + xx
        self.xy = xy if self.xy is None else self.xy + xy
        self.yy = self.yy + yy
        self.tokens += h0.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """W [n, d, d] with ĥ = x @ W^T: the transpose of A, the solution of X A ≈ Y."""
        xx, xy = self.xx.cpu(), self.xy.cpu()
        if ridge:
            d = xx.shape[-1]
            scale = ridge * xx.diagonal(dim1=-2, dim2=-1).sum(-1) / d  # [n]
            eye = torch.eye(d, dtype=xx.dtype) * scale[:, None, None]
            xx, xy = xx + eye, xy + eye
        return torch.linalg.lstsq(xx, xy, driver="gelsd").solution.transpose(1, 2)


def _keep(batch: dict) -> torch.Tensor | None:
    """The tokens that count: attention_mask 1 and not padding (labels −100); None when every token does."""
    keep = None
    if batch.get("attention_mask") is not None:
        keep = batch["attention_mask"].bool()
    if batch.get("labels") is not None and bool((batch["labels"] == -100).any()):
        pad = batch["labels"] != -100
        keep = pad if keep is None else keep & pad
    return keep


@torch.no_grad()
def calibrate_projections(model, batches, ridge: float = 0.0) -> dict:
    """Fit every stitch's W_proj on `batches` (dicts with input_ids, optionally attention_mask / labels) as the
    module docstring says, in place. The stitches must be at their start (blend a = 0: the model is the hub) with
    every expert running. Returns {"tokens": fitted tokens, "residual": per stitch, the relative residual
    ‖X A − Y‖² / ‖Y‖² of the fit averaged over experts (1: no better than 0, 0: exact)}."""
    stitches = list(model.stitches)
    if any(s.blend is None or bool(s.blend.any()) for s in stitches):
        raise BTSError("stitch.init=lstsq fits W_proj on the members' own streams, so every stitch must be at its "
                       "start (a blend gate, at 0).")
    if getattr(model, "_active", None) is not None:
        raise BTSError("stitch.init=lstsq needs every expert running (set_active_experts(None)).")
    sums = [_Sums(s.kind) for s in stitches]
    keep = {"mask": None}

    def capture(i):
        def hook(module, args, kwargs):
            sums[i].add(args[0], args[1], keep["mask"])
        return hook

    hooks = [s.register_forward_pre_hook(capture(i), with_kwargs=True) for i, s in enumerate(stitches)]
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        for batch in batches:
            batch = to_device(batch, device)
            keep["mask"] = _keep(batch)
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not sums or sums[0].xx is None or not sums[0].tokens:
        raise BTSError("stitch.init=lstsq got no calibration tokens (stitch.init_batches).")
    residual = []
    for stitch, s in zip(stitches, sums):
        w = s.solve(ridge)
        stitch.proj.copy_(w.to(stitch.proj.device, stitch.proj.dtype))
        residual.append(round(_residual(s, w.transpose(1, 2)), 6))
    return {"tokens": sums[0].tokens, "residual": residual}


def _residual(s: _Sums, a: torch.Tensor) -> float:
    """Mean over experts of ‖X A − Y‖² / ‖Y‖², from the sums alone (A: [n, d, d])."""
    xx, xy, yy = s.xx.cpu(), s.xy.cpu(), s.yy.cpu()
    fitted = torch.einsum("nij,nik,nkj->n", a, xx, a)  # ‖X A‖² = tr(A^T X^T X A)
    cross = torch.einsum("nij,nij->n", a, xy)  # <X A, Y> = tr(A^T X^T Y)
    return float(((yy - 2 * cross + fitted) / yy.clamp_min(1e-300)).mean())


def calibrate_from(model, batcher, steps: int, ridge: float = 0.0) -> dict:
    """calibrate_projections on the micro-batches of `batcher(0)` … `batcher(steps − 1)` (a bts.data.streams
    Batcher or any step -> list of batch dicts), drawn one step at a time."""
    return calibrate_projections(model, (m for step in range(steps) for m in batcher(step)), ridge)
