"""The one training loop: seed pretraining, expert training, stitch training and the trained baselines.

    result = train(model, trainable, batches, cfg, out_dir, desc="stitch")

`trainable` names the parameters the optimizer holds (AdamW; weight decay on matrices only). `batches(step)`
returns that step's micro-batches and must be a pure function of the step (bts.data.Batcher is): resuming then
needs no data-loader state. Warm-up then cosine decay to cfg.min_lr_ratio, gradient clipping and accumulation,
optional bfloat16 autocast (otherwise nothing is cast: a float64 model and its optimizer state stay float64).
Every cfg.ckpt_every steps the trainable tensors, the optimizer, the step and the RNG states are written atomically
under out_dir/ckpt; calling train() again with the same arguments resumes from the last complete checkpoint and
reproduces the uninterrupted run bit for bit on CPU. A non-finite loss stops the run
with the step number; the last good checkpoint is kept.

Under torchrun (bts.train.distributed; see docs/distributed.md) every rank takes its rows of the same global batch, so
the loss trajectory is the 1-process one. Mode "ddp" keeps a replica per rank and averages the trainable gradients
once per optimizer step; "fsdp2" trains a fully_shard-ed working copy (one unit per decoder layer, then the root) and
writes the trained tensors back into the caller's model at the end. Only rank 0 logs and writes; checkpoints hold
full tensors, so a run resumes on any number of processes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm

from bts.train import distributed, tracking
from bts.atomic import atomic_save_safetensors, atomic_write_json, atomic_write_text
from bts import faults
from bts.errors import BTSError
from bts.core.device import TRAIN_DTYPES, autocast, autocast_dtype, model_device, oom_guard, resolve_device, to_device
from bts.train.config import TrainConfig

KEEP_CHECKPOINTS = 2
# cfg.dtype -> the autocast dtype of the forward (bts.core.device.autocast_dtype). "float32" is no autocast: every
# tensor keeps its own dtype, so a float64 model trains in float64 and bf16 members stay bf16. "auto" (the default)
# is bfloat16 on a GPU and none on a CPU, so CPU runs are what they were before devices were chosen.
AUTOCAST = TRAIN_DTYPES


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    losses: list = field(default_factory=list)  # (step, loss) per step

    @property
    def final_loss(self) -> float:
        tail = [loss for _, loss in self.losses[-10:]]
        return sum(tail) / max(len(tail), 1)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps, then cosine decay to cfg.lr · cfg.min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(trainable: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in trainable.values() if p.dim() >= 2]
    no_decay = [p for p in trainable.values() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def default_loss(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


# ---- checkpoints -------------------------------------------------------------------------------------------
def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint; a damaged one is skipped with a warning (the previous one is used)."""
    candidates = sorted(ckpt_root.glob("step-*"), reverse=True) if ckpt_root.is_dir() else []
    for path in candidates:
        try:
            state = json.loads((path / "state.json").read_text())
            load_file(path / "trainable.safetensors")  # header + sizes checked: a truncated file fails here
            torch.load(path / "optim.pt", weights_only=True)
            if state.get("complete"):
                return path
        except Exception as exc:  # noqa: BLE001 - any damage means "not usable"
            print(f"bts: warning: checkpoint {path} is damaged ({type(exc).__name__}); using an earlier one",
                  file=sys.stderr)
    return None


def _save_checkpoint(ckpt_root: Path, step: int, trainable, optimizer, losses, tokens) -> None:
    final = ckpt_root / f"step-{step:07d}"
    tmp = ckpt_root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save_safetensors(tmp / "trainable.safetensors", {k: p.data for k, p in trainable.items()})
    buffer = tmp / "optim.pt"
    torch.save(optimizer.state_dict(), buffer)
    _publish(tmp, final, ckpt_root, step, tokens, losses)


def _save_checkpoint_distributed(ckpt_root: Path, step: int, trainable, optimizer, losses, tokens) -> None:
    """The same files as _save_checkpoint, written by rank 0: full tensors (FSDP2 shards are gathered, one
    tensor at a time, by every rank) and the optimizer state keyed as in a 1-process run, so any number of
    processes can resume from it."""
    tensors = {k: distributed.full_tensor(p.data).detach().cpu() for k, p in trainable.items()}
    optim = optimizer.state_dict()
    optim["state"] = {i: {k: distributed.full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                      for i, st in optim["state"].items()}
    if distributed.is_main():
        final = ckpt_root / f"step-{step:07d}"
        tmp = ckpt_root / f".tmp-step-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        atomic_save_safetensors(tmp / "trainable.safetensors", {k: t.contiguous() for k, t in tensors.items()})
        torch.save(optim, tmp / "optim.pt")
        _publish(tmp, final, ckpt_root, step, tokens, losses)
    distributed.barrier()  # no rank resumes or exits before the checkpoint is on disk


def _publish(tmp: Path, final: Path, ckpt_root: Path, step: int, tokens: int, losses) -> None:
    with open(tmp / "optim.pt", "rb") as f:
        os.fsync(f.fileno())
    atomic_write_json(tmp / "state.json", {"step": step, "tokens": tokens, "losses": losses,
                                            "rng": torch.get_rng_state().tolist(), "complete": True})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _restore(path: Path, trainable, optimizer):
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "trainable.safetensors")
    shapes = {k: tuple(p.shape) for k, p in trainable.items()}
    if set(tensors) != set(trainable) or any(tuple(t.shape) != shapes[k] for k, t in tensors.items()):
        raise BTSError(f"checkpoint {path} holds different parameters from this run (other names or shapes, e.g. "
                       "from another tokenizer); delete it or use another run directory.")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(distributed.like(tensors[name], p) if distributed.active() else tensors[name])
    optim = torch.load(path / "optim.pt", weights_only=True)
    if distributed.active():  # full moments -> this rank's shards (FSDP2) or device (DDP)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optim["state"] = {i: {k: distributed.like(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape
                              else v for k, v in st.items()} for i, st in optim["state"].items()}
    optimizer.load_state_dict(optim)
    torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
    return state["step"], state["tokens"], [tuple(x) for x in state["losses"]]


# ---- the loop ----------------------------------------------------------------------------------------------
def train(model: torch.nn.Module, trainable: dict[str, torch.nn.Parameter], batches: Callable[[int], list[dict]],
          cfg: TrainConfig, out_dir: str | os.PathLike, *, desc: str = "train", seed: int = 0,
          loss_fn: Callable = default_loss, step_hook: Callable[[int], None] | None = None,
          metrics_fn: Callable[[], dict] | None = None, parallel: str | None = None,
          device: str | torch.device | None = None) -> TrainResult:
    """Train `trainable` (a subset of model's parameters) for cfg.steps; resume from out_dir/ckpt if present.
    parallel: "ddp" | "fsdp2" under torchrun (default $BTS_PARALLEL, else ddp); ignored in a single process.
    device: where a single process trains (default: where the model is; the model is moved there, micro-batches
    follow); under torchrun each rank trains on the device its process group was joined with."""
    if cfg.dtype not in AUTOCAST:
        raise BTSError(f"{desc}: train dtype must be one of {', '.join(AUTOCAST)} (got '{cfg.dtype}').")
    mode = distributed.parallel_mode(parallel)
    if mode == "fsdp2" and loss_fn is not default_loss and not getattr(loss_fn, "through_forward", False):
        # A custom loss may call submodules directly, past the root FSDP unit's unshard hook; replicas are safe.
        distributed.warn0(f"{desc}: a custom loss runs with ddp, not fsdp2 (FSDP2 needs the loss to go through "
                          "model.forward).")
        mode = "ddp"
    out_dir = Path(out_dir)
    main = distributed.is_main()
    tracker = tracking.start(getattr(cfg, "report_to", []) if main else [], out_dir, desc, dataclasses.asdict(cfg))
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "ckpt"
    metrics_path = out_dir / "metrics.jsonl"
    caller_trainable, work = trainable, model
    if mode is not None:
        rank, world, device = distributed.init()
        work, trainable, step_hook = _prepare_parallel(model, trainable, mode, device, step_hook)
    else:
        device = model_device(model) if device is None else resolve_device(device, f"{desc} device")
        if model_device(model) != device:
            torch.nn.Module.to(model, device)  # a pure move (a model's own to() may also cast; see _prepare_parallel)
    cast = autocast_dtype(cfg.dtype, device)
    if cfg.compile:  # compiled lazily, at the first step (docs/performance.md: minutes on CPU, then faster steps)
        work = torch.compile(work)
        if main:
            print(f"[{desc}] torch.compile: the first step compiles the model (minutes on a CPU)", file=sys.stderr)
    optimizer = make_optimizer(trainable, cfg)
    torch.manual_seed(seed)
    start, tokens, losses = 0, 0, []
    resume_from = _latest_checkpoint(ckpt_root) if main else None
    if mode is not None:  # every rank resumes from the checkpoint rank 0 chose
        box = [resume_from]
        dist.broadcast_object_list(box, src=0)
        resume_from = box[0]
    if resume_from is not None:
        start, tokens, losses = _restore(resume_from, trainable, optimizer)
    if main:
        _truncate_metrics(metrics_path, start)
    work.train()
    interactive = sys.stderr.isatty() and main
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not interactive, dynamic_ncols=True)
    t0, window_tokens, window_t = time.perf_counter(), 0, time.perf_counter()
    metrics_file = open(metrics_path, "a") if main else None
    save = _save_checkpoint if mode is None else _save_checkpoint_distributed
    try:
        for step in range(start, cfg.steps):
            faults.point(f"{desc}:{step}")
            if step_hook is not None:
                step_hook(step)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = batches(step)
            step_loss = 0.0
            with oom_guard(f"{desc} step {step}", device, batch=_shape(micro_batches)):
                for micro in micro_batches:
                    n_tok = int(micro["input_ids"].numel())  # tokens of the global batch, as in a 1-process run
                    if mode is not None:
                        micro = distributed.shard_batch(micro, rank, world)
                    micro = to_device(micro, device)
                    with autocast(device, enabled=cast is not None):
                        loss = loss_fn(work, micro)
                    if mode is None and not torch.isfinite(loss):
                        raise _non_finite(desc, loss.item(), step, ckpt_root)
                    (loss / len(micro_batches)).backward()
                    step_loss += loss.item() / len(micro_batches)
                    tokens += n_tok
                    window_tokens += n_tok
                if mode is not None:
                    # Checked after the all-reduce so that every rank stops at the same step (no rank left waiting).
                    step_loss = distributed.mean_scalar(step_loss, device)
                    if not math.isfinite(step_loss):
                        raise _non_finite(desc, step_loss, step, ckpt_root)
                    if mode == "ddp":
                        distributed.average_gradients(list(trainable.values()))
                grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()),
                                                           cfg.clip if cfg.clip > 0 else 1e30)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append((step, step_loss))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                record = {"phase": desc, "step": done, "loss": step_loss, "lr": lr,
                          "grad_norm": float(distributed.full_tensor(grad_norm)),
                          "tokens": tokens, "tok_per_s": window_tokens / max(now - window_t, 1e-9)}
                if metrics_fn is not None:
                    if work is not model:  # metrics read the caller's model: bring it up to date first
                        _copy_back(trainable, caller_trainable)
                    record.update(metrics_fn())
                if main:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    tracker.log(record)
                if main and not interactive:
                    eta = (now - t0) / max(done - start, 1) * (cfg.steps - done)
                    print(f"[{desc}] step {done}/{cfg.steps} loss {step_loss:.4f} lr {lr:.2e} "
                          f"{record['tok_per_s']:.0f} tok/s eta {eta:.0f}s", file=sys.stderr, flush=True)
                window_tokens, window_t = 0, now
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                save(ckpt_root, done, trainable, optimizer, losses, tokens)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        tracker.close()
    faults.point(f"{desc}:{cfg.steps}")
    if work is not model:
        _copy_back(trainable, caller_trainable)
    model.eval()
    return TrainResult(steps=cfg.steps, tokens=tokens, wall_s=time.perf_counter() - t0, losses=losses)


def _shape(micro_batches: list[dict]) -> str:
    """A step's batch as the out-of-memory sentence names it: micro-batches x sequences x tokens."""
    if not micro_batches:
        return ""
    rows, length = micro_batches[0]["input_ids"].shape[:2]
    return f"{len(micro_batches)} micro-batch(es) of {rows} x {length} tokens"


def _non_finite(desc: str, value: float, step: int, ckpt_root: Path) -> BTSError:
    return BTSError(f"{desc}: the loss became {value} at step {step}; training stopped "
                    f"(the last good checkpoint in {ckpt_root} is kept; try a lower learning rate).")


# ---- data parallel ------------------------------------------------------------------------------------------
def _prepare_parallel(model, trainable: dict, mode: str, device, step_hook):
    """(working model, its trainable tensors under the caller's names, step hook acting on it).

    Frozen parameters stop requiring gradients, so nothing computes or communicates them. ddp: the caller's
    model itself, moved to the device, rank 0's values broadcast. fsdp2: a deep copy sharded in place (the
    caller's model stays whole, on its device, and receives the trained tensors at the end); a step hook of the
    form functools.partial(f, model) is re-pointed at the copy."""
    keep = {id(p) for p in trainable.values()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    if mode == "ddp":
        # nn.Module.to itself, a pure device move: a model's own to() may also cast (BTSForCausalLM.to puts its
        # stitches back in float32, which turned float64 stitches into float32 on every rank).
        torch.nn.Module.to(model, device)
        distributed.broadcast_parameters(model)
        return model, trainable, step_hook
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [k for k, p in trainable.items() if id(p) not in names]
    if missing:
        raise BTSError(f"trainable tensor(s) {missing[:3]} are not parameters of the model being trained.")
    work = copy.deepcopy(model)
    distributed.broadcast_parameters(work)
    distributed.fsdp2_shard(work, device)
    sharded = dict(work.named_parameters())
    if isinstance(step_hook, functools.partial) and step_hook.args and step_hook.args[0] is model:
        step_hook = functools.partial(step_hook.func, work, *step_hook.args[1:], **step_hook.keywords)
    return work, {k: sharded[names[id(p)]] for k, p in trainable.items()}, step_hook


def _copy_back(sharded: dict, caller: dict) -> None:
    """Gather the working copy's tensors (a collective) into the caller's parameters."""
    with torch.no_grad():
        for k, p in sharded.items():
            caller[k].copy_(distributed.full_tensor(p.data).to(caller[k].device))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
