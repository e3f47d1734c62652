"""Experiment tracking next to metrics.jsonl: TensorBoard event files and Weights & Biases, off by default.

`train.report_to: [tensorboard, wandb]` (a phase's TrainConfig) sends every record the loop writes to
metrics.jsonl (loss, lr, tokens, tok_per_s, grad_norm and, for the stitches, the per-stitch gate statistics,
flattened to names such as gates/0/seed) to the trackers, at the record's step. TensorBoard writes event files
under <phase dir>/tensorboard. W&B runs offline (files under <phase dir>/wandb, to `wandb sync` later) unless
WANDB_MODE says otherwise or api.wandb.ai is reachable, so a machine without network never waits on it. Each
needs its optional extra (`pip install 'bts[tensorboard]'`, `'bts[wandb]'`); a missing one is refused in one
sentence before anything is written.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

from bts.errors import BTSError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs (and the extra's name)


def check(report_to, where: str = "train.report_to") -> list[str]:
    """The tracker names, checked: known, and their package installed."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name not in TRACKERS:
            raise BTSError(f"{where} names '{name}', which is not a tracker (choose from {', '.join(TRACKERS)}).")
        if not installed(TRACKERS[name]):
            raise BTSError(f"{where} includes '{name}', which needs the {TRACKERS[name]} package: "
                           f"pip install 'bts[{name}]'.")
    return names


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


class Tracker:
    """The trackers of one training phase; log(record) per metrics.jsonl line; close() at the end."""

    def __init__(self, names: list[str], out_dir, phase: str, config: dict | None = None):
        self.names, self.out_dir, self.phase, self.config = names, Path(out_dir), phase, config or {}
        self._tb = self._wandb = None

    def log(self, record: dict) -> None:
        if not self.names:
            return
        step = int(record.get("step", 0))
        scalars = dict(_flatten(record))
        scalars.pop("step", None)
        if "tensorboard" in self.names:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            for key, value in scalars.items():
                self._tb.add_scalar(f"{self.phase}/{key}", value, step)
            self._tb.flush()
        if "wandb" in self.names:
            if self._wandb is None:
                self._wandb = _wandb_run(self.out_dir, self.phase, self.config)
            self._wandb.log({f"{self.phase}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._tb = self._wandb = None


def start(report_to, out_dir, phase: str, config: dict | None = None) -> Tracker:
    return Tracker(check(report_to), out_dir, phase, config)


def _wandb_run(out_dir: Path, phase: str, config: dict):
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if online() else "offline")
    (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "bts"), name=phase, dir=str(out_dir), mode=mode,
                      config=config, reinit=True)


def online(host: str = "api.wandb.ai", timeout: float = 2.0) -> bool:
    """Whether W&B's server answers (a TCP connect, nothing sent); offline settings of the hubs mean no."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("WANDB_MODE") is None:
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _flatten(value, prefix: str = ""):
    """(name, float) for every number in a record: nested dicts and lists joined with '/'."""
    if isinstance(value, bool):
        yield prefix, float(value)
    elif isinstance(value, (int, float)):
        yield prefix, float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}/{i}" if prefix else str(i))
