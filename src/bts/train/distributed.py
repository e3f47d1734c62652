"""Data-parallel training across processes launched by torchrun (DDP-style replicas or FSDP2 shards).

    rank, world, device = distributed.init()     # torchrun env -> process group; alone -> (0, 1, cpu|cuda)
    distributed.print0("only rank 0 prints")

The same script or `python -m bts run RECIPE` runs alone or under `torchrun --nproc_per_node=N`: init() reads
RANK / WORLD_SIZE / LOCAL_RANK, picks nccl on CUDA and gloo on CPU, and is a no-op without them. The helpers below
are what bts.train.loop needs: a rank's slice of the global batch, averaging gradients of the trainable tensors only,
FSDP2 sharding per decoder layer, and gathering / scattering full tensors for rank-count-independent checkpoints.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from bts.errors import BTSError

PARALLEL_MODES = ("ddp", "fsdp2")
ENV_PARALLEL = "BTS_PARALLEL"  # ddp (default under torchrun) | fsdp2


# ---- process group ------------------------------------------------------------------------------------------
def launched() -> bool:
    """True when started by torchrun (or anything that sets its environment) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_joined: dict = {}  # the device this process joined its process group with (every later init() returns it)


def init(backend: str | None = None, timeout_s: int = 1800,
         device: torch.device | None = None) -> tuple[int, int, torch.device]:
    """Join the torchrun process group if there is one (idempotent); return (rank, world_size, device).
    device: the run's (bts.core.device.resolve_device); a CUDA one is this rank's GPU (LOCAL_RANK) with nccl, the
    CPU uses gloo. None: CUDA when available. Once joined, the device is the one joined with."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not launched():
        return 0, 1, torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
    if dist.is_initialized() and "device" in _joined:
        return dist.get_rank(), dist.get_world_size(), _joined["device"]
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
    _joined["device"] = device
    return dist.get_rank(), dist.get_world_size(), device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _joined.clear()


def parallel_mode(requested: str | None = None) -> str | None:
    """The data-parallel mode of this process: None alone, else `requested`, $BTS_PARALLEL or "ddp"."""
    if not active():
        return None
    mode = (requested or os.environ.get(ENV_PARALLEL) or "ddp").lower()
    if mode not in PARALLEL_MODES:
        raise BTSError(f"{ENV_PARALLEL}={mode!r} is not one of {', '.join(PARALLEL_MODES)}.")
    return mode


# ---- batches and reductions ---------------------------------------------------------------------------------
def shard_batch(batch: dict, rank_: int, world_: int) -> dict:
    """This rank's contiguous rows of a global micro-batch (tensors with the batch's leading size are sliced)."""
    rows = batch["input_ids"].shape[0]
    if rows % world_:
        raise BTSError(f"the micro-batch has {rows} sequences, which {world_} processes cannot split evenly; "
                       f"make batch_size / grad_accum a multiple of {world_}.")
    per = rows // world_
    return {k: v[rank_ * per:(rank_ + 1) * per] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
            for k, v in batch.items()}


def mean_scalar(value: float, device) -> float:
    """The mean of a Python float over ranks (a NaN on any rank makes it NaN everywhere)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of the gradients over ranks, in one flat bucket per dtype (float64 gradients are reduced in float64):
    the all-reduce DDP does, once per optimizer step (so gradient accumulation costs no extra communication) and
    only over the trainable tensors. A parameter without a gradient on this rank (an unused MoE expert) contributes
    zeros."""
    world_ = dist.get_world_size()
    by_dtype: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world_)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's weights everywhere, so replicas start identical even if their initialisation drew differently."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


# ---- FSDP2 ----------------------------------------------------------------------------------------------------
def decoder_layer_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the blocks FSDP2 should shard one by one: every transformers sub-model's _no_split_modules
    (its decoder layer), so a stitched model shards each member's layers."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return names


def fsdp2_shard(model: torch.nn.Module, device: torch.device) -> None:
    """fully_shard every decoder layer, then the root (embeddings, norms, head, stitch layers), in place over all
    ranks. Frozen parameters are sharded too and get no gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = decoder_layer_classes(model)
    for m in list(model.modules()):
        if m is not model and type(m).__name__ in layers:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank must call it), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `reference`: this rank's shard when the reference is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.device, reference.dtype), reference.device_mesh,
                                 reference.placements)
    return full.to(reference.device, reference.dtype)


def warn0(msg: str) -> None:
    if is_main():
        print(f"bts: warning: {msg}", file=sys.stderr)


# ---- launching ------------------------------------------------------------------------------------------------
def expert_commands(recipe_arg: str, recipe, run_dir: str | None, overrides: list[str]) -> list[str]:
    """One `bts run` command per expert stage: experts are independent jobs (each may itself be a torchrun job)
    sharing the run directory; the seed stage must have finished first."""
    import shlex
    from pathlib import Path

    root = str(Path(run_dir or recipe.run_dir or Path("runs") / recipe.name).resolve())
    return [shlex.join(["bts", "run", recipe_arg, *overrides, "--stages", f"expert:{d}", "--run-dir", root])
            for d in recipe.expert_domains]
