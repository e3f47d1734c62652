"""Loading a run's models for evaluation, with their parameter accounting, and quiet library output while the
pipeline runs (also when it is used from Python rather than the `bts` command)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def load_hf(path, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """A saved *ForCausalLM (seed, expert) and its accounting: every parameter trained, all active. Its weights
    are read straight onto `device` in `dtype` (default: the CPU, float32)."""
    from transformers import AutoModelForCausalLM

    from bts.core.device import load_kwargs

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **load_kwargs(device)).eval()
    n = count_params(model)
    return model, {"trainable_params": n, "total_params": n, "active_params": n}


def load_bts(path, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """A saved stitched model and its accounting: only the stitches trained, every member active. Members are
    read onto `device` in `dtype`; the stitches stay fp32."""
    from bts.core.model import BTSForCausalLM

    model = BTSForCausalLM.from_pretrained(path, dtype=dtype, device_map=device).eval()
    stitch = sum(p.numel() for p in model.stitch_parameters())
    total = count_params(model)
    return model, {"trainable_params": stitch, "total_params": total, "active_params": total}


@contextmanager
def quiet_libraries():
    """bts draws its own progress bars: transformers' per-file 'Loading weights' bars and info logs are off while
    the pipeline runs, and restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
