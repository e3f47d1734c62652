"""The one training loop: seed pretraining, expert training, stitch training and the trained baselines.

    result = train(model, trainable, batches, cfg, out_dir, desc="stitch")

`trainable` names the parameters the optimizer holds (AdamW; weight decay on matrices only). `batches(step)`
returns that step's micro-batches and must be a pure function of the step (bts.data.Batcher is): resuming then
needs no data-loader state. Warm-up then cosine decay to cfg.min_lr_ratio, gradient clipping and accumulation,
optional bfloat16 autocast. Every cfg.ckpt_every steps the trainable tensors, the optimizer, the step and the RNG
states are written atomically under out_dir/ckpt; calling train() again with the same arguments resumes from the
last complete checkpoint and reproduces the uninterrupted run bit for bit on CPU. A non-finite loss stops the run
with the step number; the last good checkpoint is kept.
"""

from __future__ import annotations

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
from safetensors.torch import load_file
from tqdm.auto import tqdm

from bts.atomic import atomic_save_safetensors, atomic_write_json, atomic_write_text
from bts.errors import BTSError
from bts.recipe import TrainConfig

KEEP_CHECKPOINTS = 2


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
    with open(buffer, "rb") as f:
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
    if set(tensors) != set(trainable):
        raise BTSError(f"checkpoint {path} holds different parameters from this run; "
                       "delete it or use another run directory.")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(torch.load(path / "optim.pt", weights_only=True))
    torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
    return state["step"], state["tokens"], [tuple(x) for x in state["losses"]]


# ---- the loop ----------------------------------------------------------------------------------------------
def train(model: torch.nn.Module, trainable: dict[str, torch.nn.Parameter], batches: Callable[[int], list[dict]],
          cfg: TrainConfig, out_dir: str | os.PathLike, *, desc: str = "train", seed: int = 0,
          loss_fn: Callable = default_loss, step_hook: Callable[[int], None] | None = None,
          metrics_fn: Callable[[], dict] | None = None) -> TrainResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "ckpt"
    metrics_path = out_dir / "metrics.jsonl"
    optimizer = make_optimizer(trainable, cfg)
    torch.manual_seed(seed)
    start, tokens, losses = 0, 0, []
    resume_from = _latest_checkpoint(ckpt_root)
    if resume_from is not None:
        start, tokens, losses = _restore(resume_from, trainable, optimizer)
    _truncate_metrics(metrics_path, start)
    model.train()
    interactive = sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not interactive, dynamic_ncols=True)
    t0, window_tokens, window_t = time.perf_counter(), 0, time.perf_counter()
    metrics_file = open(metrics_path, "a")
    try:
        for step in range(start, cfg.steps):
            if step_hook is not None:
                step_hook(step)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = batches(step)
            step_loss = 0.0
            for micro in micro_batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                    loss = loss_fn(model, micro)
                if not torch.isfinite(loss):
                    raise BTSError(f"{desc}: the loss became {loss.item()} at step {step}; training stopped "
                                   f"(the last good checkpoint in {ckpt_root} is kept; try a lower learning rate).")
                (loss / len(micro_batches)).backward()
                step_loss += loss.item() / len(micro_batches)
                n_tok = int(micro["input_ids"].numel())
                tokens += n_tok
                window_tokens += n_tok
            grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.clip if cfg.clip > 0 else 1e30)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append((step, step_loss))
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                record = {"phase": desc, "step": done, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                          "tokens": tokens, "tok_per_s": window_tokens / max(now - window_t, 1e-9)}
                if metrics_fn is not None:
                    record.update(metrics_fn())
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if not interactive:
                    eta = (now - t0) / max(done - start, 1) * (cfg.steps - done)
                    print(f"[{desc}] step {done}/{cfg.steps} loss {step_loss:.4f} lr {lr:.2e} "
                          f"{record['tok_per_s']:.0f} tok/s eta {eta:.0f}s", file=sys.stderr, flush=True)
                window_tokens, window_t = 0, now
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                _save_checkpoint(ckpt_root, done, trainable, optimizer, losses, tokens)
    finally:
        bar.close()
        metrics_file.close()
    model.eval()
    return TrainResult(steps=cfg.steps, tokens=tokens, wall_s=time.perf_counter() - t0, losses=losses)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
