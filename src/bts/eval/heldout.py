"""Held-out scoring: mean next-token loss of any causal LM over fixed windows of held-out tokens."""

from __future__ import annotations

import torch

from bts.core.device import model_device


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token NLL (nats/token) over all windows, `batch_size` windows at a time on the model's device
    (logits in fp32; the sum in float64 on the device, read back once)."""
    model.eval()
    device = model_device(model)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.double()
        count += ids[:, 1:].numel()
    return total.item() / count
